"""Demo: teach a small VLM to see synthetic scenes, on a CPU (4-5 minutes of training on the 2-core
AMD EPYC with avx512_bf16 measured in docs/training.md; an older recipe took 6-6.5 on one without AVX-512).

    python train_vision.py                  # then: python evaluate.py
The model is trained from scratch (tokenizer included) on coloured shapes and learns to describe
them and answer questions about them; it is saved to checkpoints/vision_trained_model.pt.
"""
from __future__ import annotations

import shlex
import sys

import torch

import probes
import scenes
from checkpoint import discard_resume, load_checkpoint
from distributed import say
from collate import Collator
from devices import resolve_device
from errors import ArgumentParser, UserError, cli
from evaluate import evaluate_scenes, generate_texts, print_table
from model import PRESETS, VLM, VLMConfig, count_params
from tokenizer import Tokenizer
from train_config import add_train_flags, config_from_args
from sharding import trainer_class
from trainer import TrainingInterrupted


def build_parser():
    p = ArgumentParser(
        description="合成数据演示：在 CPU 上从零训练一个能看懂简单图形的小型视觉语言模型（2 核 AMD EPYC（avx512_bf16）上训练约 3.5～4.5 分钟）。")
    add_train_flags(p, batch_size=48, epochs=7, lr=1e-3, optimizer="muon", muon_steps=3, keep="last")
    p.add_argument("--train-size", type=int, default=6000, help="每轮的训练场景数 (默认: 6000)")
    p.add_argument("--val-size", type=int, default=256, help="验证场景数 (默认: 256)")
    p.add_argument("--lang", default="zh", choices=["zh", "en"], help="描述语言: zh 中文 / en 英文 (默认: zh)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="模型大小 (默认: demo，各 2 层，适合 CPU)")
    p.add_argument("--hide", type=float, default=0.15,
                   help="训练时回答里的每个 token 以这个概率换成 <pad> 喂给模型（要预测的仍是原文），下一个词只能看图说出，"
                        "不能照前面的词猜（用意和实测见 docs/training.md）。0 表示不换 (默认: 0.15)")
    p.add_argument("--recolour", type=float, default=0.25,
                   help="训练时每个场景以这个概率把图的颜色通道对调（形状不变，颜色变成没有名字的颜色；不用会把形状画到它被留出的颜色附近的对调），只问不说颜色的问题"
                        "（几个、什么形状），让语言模型不论颜色都认得出形状（实测见 docs/training.md）。0 表示不换 (默认: 0.25)")
    p.add_argument("--reshape", type=float, default=0.15,
                   help="训练时没换色的场景再以这个概率把形状画成没有名字的形状（圆环、星形、六边形、半圆，颜色不变），只问"
                        "几个形状和某个位置是什么颜色，让语言模型不论形状都认得出颜色（实测见 docs/training.md）。0 表示不换 (默认: 0.15)")
    p.add_argument("--no-probe", action="store_true", help="关闭视觉编码器的辅助网格监督（不建议）")
    p.add_argument("--eval-scenes", type=int, default=200, help="训练后评估用的测试场景数，0 表示跳过 (默认: 200)")
    return p


@cli
def main(argv=None):
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    cfg.validate()
    resolve_device(a.device)                      # fail on a bad --device before any work
    rates = (a.hide, a.recolour, a.reshape)
    if a.train_size < 1 or a.val_size < 0 or a.eval_scenes < 0 or not all(0 <= x < 1 for x in rates):
        raise UserError("--train-size 必须为正数，--val-size 和 --eval-scenes 不能为负数，"
                        "--hide、--recolour 和 --reshape 必须在 [0, 1) 之间。")
    torch.manual_seed(a.seed)                     # the same --seed builds the same initial weights
    if a.checkpoint:
        model, tok, meta = load_checkpoint(a.checkpoint)
        mcfg = model.cfg
    else:
        tok = Tokenizer.train(scenes.all_texts(a.lang), vocab_size=1024, words=scenes.words(a.lang))
        mcfg = VLMConfig(**PRESETS[a.preset])
        mcfg.lm_vocab_size = -(-tok.vocab_size // 64) * 64
        mcfg.image_token_id, mcfg.pad_token_id = tok.image_id, tok.pad_id
        mcfg.bos_token_id, mcfg.eos_token_id = tok.bos_id, tok.eos_id
        model = VLM(mcfg)
    say(f"模型参数: 视觉编码器 {count_params(model.vision) / 1e6:.2f}M, 投影层 {count_params(model.projector) / 1e6:.2f}M, "
          f"语言模型 {count_params(model.lm) / 1e6:.2f}M；每张图 {mcfg.image_tokens} 个图像 token")
    train = scenes.SceneDataset(a.train_size, "train", a.seed, a.lang, mcfg.vit_image_size, hide=a.hide,
                                recolour=a.recolour, reshape=a.reshape)
    val = scenes.SceneDataset(a.val_size, "test", a.seed + 1000, a.lang, mcfg.vit_image_size)
    probe = None if a.no_probe else probes.CellProbe(model.vision, mcfg.vit_dim)

    def show_samples(model, epoch):
        samples = [val[i] for i in range(3)]
        preds = generate_texts(model, tok, [{"image": s["image"], "messages": s["messages"][:1]} for s in samples])
        for s, pred in zip(samples, preds):
            print(f"  问: {s['messages'][0]['content']}  答: {pred}  （正确: {s['messages'][1]['content']}）")

    meta = {"lang": a.lang, "data": "synthetic", "preset": a.preset}
    trainer = trainer_class(cfg)(model, tok, train, Collator(tok, mcfg, pack=model.lm.packs), cfg, val_data=val, aux=probe,
                                   on_epoch_end=show_samples, meta=meta)
    try:
        trainer.fit()
    except TrainingInterrupted as e:
        if trainer.is_main:
            again = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--resume"]
            print(f"\n训练已暂停，断点已保存到 {e}。继续训练：python train_vision.py {shlex.join(again + ['--resume'])}",
                  file=sys.stderr)
        sys.exit(130)
    if not trainer.is_main:                       # under torchrun: rank 0 alone reports and evaluates
        return
    discard_resume(a.output)
    print(f"训练完成，模型已保存到 {a.output}")
    if a.eval_scenes:
        best, tok, _ = load_checkpoint(a.output, trainer.device)
        results = {"已见组合": evaluate_scenes(best, tok, a.eval_scenes, "test", 0, a.lang),
                   "未见组合": evaluate_scenes(best, tok, a.eval_scenes, "heldout", 0, a.lang)}
        print_table(results)


if __name__ == "__main__":
    sys.exit(main())
