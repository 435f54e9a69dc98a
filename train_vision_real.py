"""Train on real captioned images: local folders and Hugging Face data sets, mixed if you like.

    python train_vision_real.py --data-source local --data-path data/vision_train --batch-size 4 --epochs 20
    python train_vision_real.py --data-source huggingface --dataset-name nlphuji/flickr30k --batch-size 8 --epochs 10 --lr 1e-4
Each epoch prints the validation loss, BLEU-4 and CIDEr-D on a validation subset and a few
generated captions beside their references. The data side lives in sources.py (and the modules
it reads with), the loop in trainer.py, the metrics in metrics.py; this file only parses flags
and wires them together.
"""
from __future__ import annotations

import sys

import torch

import backbones
import captions
import datacheck
import images
import probes
import sources
from checkpoint import discard_resume, load_checkpoint
from distributed import init_distributed, say
from collate import Collator
from devices import default_workers, resolve_device
from errors import ArgumentParser, UserError, cli
from evaluate import evaluate_captions, print_caption_scores
from model import PRESETS, VLM, VLMConfig, count_params
from tokenizer import Tokenizer
from train_config import add_train_flags, config_from_args
from sharding import trainer_class
from trainer import EpochReport, TrainingInterrupted


def build_parser():
    p = ArgumentParser(
        description="用真实图片训练视觉语言模型：本地图片文件夹或 Hugging Face 数据集（可混合多个）。")
    p.add_argument("--data-source", choices=["local", "huggingface"],
                   help="数据源: local 或 huggingface（同时给出 --data-path 和 --dataset-name 时混合使用）")
    p.add_argument("--data-path", action="append", metavar="路径[:权重]",
                   help=f"本地数据路径，可重复给出以混合多个文件夹 (local 默认: {sources.DEFAULT_LOCAL})")
    p.add_argument("--dataset-name", action="append", metavar="名称[:权重]",
                   help="HuggingFace数据集名称或本地副本路径（save_to_disk 文件夹、parquet、webdataset .tar），可重复给出")
    add_train_flags(p)                  # TrainConfig's own defaults
    d = p.add_argument_group("数据")
    d.add_argument("--split", default="train", help="训练用的划分；有 split 列的数据集（如 Flickr30k）按列值筛选 (默认: train)")
    d.add_argument("--image-column", help="图片列名 (默认: 自动识别)")
    d.add_argument("--caption-column", help="描述列名，多个用逗号分隔 (默认: 自动识别)")
    d.add_argument("--all-captions", action="store_true", help="每条描述各算一个样本（默认每轮每张图随机取一条描述）")
    d.add_argument("--streaming", action="store_true", help="流式读取 Hugging Face 数据集，不整体下载")
    d.add_argument("--shuffle-buffer", type=int, default=1000, help="流式读取的打乱缓冲区大小 (默认: 1000)")
    d.add_argument("--steps-per-epoch", type=int, default=1000, help="流式读取时每轮的批次数 (默认: 1000)")
    d.add_argument("--val-ratio", type=float, default=0.05,
                   help="数据集没有验证划分时留作验证的比例 (默认: 0.05)")
    d.add_argument("--eval-size", type=int, default=100,
                   help="每轮计算 BLEU-4 / CIDEr-D 的验证图片数，0 表示不算 (默认: 100)")
    d.add_argument("--select-by", choices=["loss", "cider"], default="loss",
                   help="按验证损失或 CIDEr-D 保存最佳模型 (默认: loss)")
    d.add_argument("--max-bad-ratio", type=float, default=0.05,
                   help="坏图片（缺失、损坏、截断）超过这个比例就不开始训练 (默认: 0.05)")
    d.add_argument("--max-pixels", type=int, default=images.MAX_PIXELS,
                   help=f"单张图片的像素上限，超过的不解码直接跳过 (默认: {images.MAX_PIXELS})")
    d.add_argument("--check-data", action="store_true",
                   help="只检查数据、不训练：按对话模板展示几条样本（【】内是要训练的部分），统计样本、图片、轮数、"
                        "token 长度，列出每个问题及其样本 id；有问题时退出码非 0")
    m = p.add_argument_group("模型（不给 --checkpoint 时从头训练）")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="模型大小 (默认: tiny，适合 CPU)")
    m.add_argument("--vocab-size", type=int, default=4096, help="从头训练时分词器的词表大小 (默认: 4096)")
    backbones.add_flags(p)
    return p


def build_model(a, texts, words=()):
    """(model, tokenizer, meta). --checkpoint continues our own .pt with its tokenizer;
    otherwise a BPE tokenizer is trained on the captions and prompts (each of `words` one token)
    and a preset is built."""
    if a.checkpoint:
        model, tok, meta = load_checkpoint(a.checkpoint)
        return model.train(), tok, {"base": a.checkpoint, "preset": meta.get("preset")}
    tok = Tokenizer.train(list(texts) + captions.PROMPTS * 10, vocab_size=a.vocab_size, words=words)
    cfg = VLMConfig(**PRESETS[a.preset])
    cfg.lm_vocab_size = -(-tok.vocab_size // 64) * 64
    cfg.image_token_id, cfg.pad_token_id = tok.image_id, tok.pad_id
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_id, tok.eos_id
    return VLM(cfg), tok, {"preset": a.preset}


SMALL_DATA = 2000        # from scratch, fewer training samples per epoch than this learn no captions


def scratch_hint(a, samples: int) -> str | None:
    """One line for a from-scratch run on little data, which learns the captions' pattern but not
    to look at the image, whatever the learning rate (measured: docs/datasets.md)."""
    if a.checkpoint or a.vision_encoder or samples >= SMALL_DATA:
        return None
    return (f"提示：从头训练、每轮只有 {samples} 个样本，模型多半学不会看图（实测 300 张图训练 5 轮：--lr 1e-4 的描述"
            f"全部说错，--lr 1e-3 对每张图都说同一句话）。请用几千张图（make demo 用 6000 张），或在预训练模型上训练"
            f"（--checkpoint、--vision-encoder，见 docs/models.md）；详见 docs/datasets.md 的“小数据从头训练”。")


def check_flags(a):
    checks = [(0 <= a.val_ratio < 1, "--val-ratio 必须在 [0, 1) 之间"), (a.eval_size >= 0, "--eval-size 不能为负数"),
              (0 <= a.max_bad_ratio <= 1, "--max-bad-ratio 必须在 [0, 1] 之间"),
              (a.max_pixels > 0, "--max-pixels 必须是正整数"), (a.steps_per_epoch >= 1, "--steps-per-epoch 必须是正整数"),
              (a.vocab_size >= 300, "--vocab-size 至少为 300"),
              (a.select_by != "cider" or a.eval_size > 0, "--select-by cider 需要 --eval-size 大于 0"),
              (a.batch_size != "auto" or not a.streaming, "流式读取时每轮的样本数是 --steps-per-epoch × --batch-size，"
                                                          "请给出具体的 --batch-size（不能用 auto）")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg + "。")


@cli
def main(argv=None):
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    cfg.validate()
    check_flags(a)
    init_distributed(resolve_device(a.device))     # under torchrun: the group first, so rank 0 alone checks images
    workers = default_workers() if a.workers < 0 else a.workers
    data = sources.from_args(a, workers)
    texts = data.texts()
    if not texts:
        raise UserError("训练数据里没有任何描述文字。")
    torch.manual_seed(a.seed)                     # the same --seed builds the same initial weights
    model, tok, meta = backbones.build(a, lambda: build_model(a, texts, data.words()))   # --vision-encoder, HF LLMs, --train
    size = model.cfg.vit_image_size
    say(f"模型参数: 视觉编码器 {count_params(model.vision) / 1e6:.2f}M, 投影层 {count_params(model.projector) / 1e6:.2f}M, "
          f"语言模型 {count_params(model.lm) / 1e6:.2f}M；图片 {size}×{size}，每张 {model.cfg.image_tokens} 个图像 token")
    limit = sources.Limit(tok, model.cfg.image_tokens, model.cfg.lm_max_len)
    if a.check_data:
        sys.exit(datacheck.run(data, limit, size))
    sets = data.training_data(size, limit)
    if sets.workers < workers:
        cfg.workers = sets.workers
    eval_items = sets.eval_items(a.eval_size)        # caption metrics on a fixed validation subset
    lang = captions.caption_language(texts)
    prompt = captions.PROMPT_ZH if lang == "zh" else captions.PROMPT_EN
    longest = max((len(tok.encode(c)) for _, refs in eval_items for c in refs), default=0)

    def on_epoch_end(model, epoch):
        if not eval_items:
            return EpochReport()
        r = evaluate_captions(model, tok, eval_items, prompt, max_new_tokens=min(64, longest + 8))
        print_caption_scores(r, "验证集 ")
        return EpochReport({"bleu4": round(r["bleu4"], 5), "cider": round(r["cider"], 5), "tokenisation": r["tokenisation"]},
                           score=-r["cider"] if a.select_by == "cider" else None)

    meta = {**meta, "lang": lang, "data": data.names, "select_by": a.select_by}
    trainer = trainer_class(cfg)(model, tok, sets.train, Collator(tok, model.cfg, pack=model.lm.packs), cfg, val_data=sets.val,
                                 aux=probes.for_model(model), on_epoch_end=on_epoch_end, meta=meta)
    if hint := scratch_hint(a, len(sets.train)):
        say(hint)
    try:
        trainer.fit()
    except TrainingInterrupted as e:
        if trainer.is_main:
            print(f"\n训练已暂停，断点已保存到 {e}。加上 --resume 重新运行同一条命令即可继续。", file=sys.stderr)
        sys.exit(130)
    if not trainer.is_main:                       # under torchrun: rank 0 alone reports
        return
    discard_resume(a.output)
    bad = sets.runtime_bad()
    if bad:
        print(f"训练中又跳过了 {bad} 张无法读取的图片。")
    print(f"训练完成，模型已保存到 {a.output}")


if __name__ == "__main__":
    sys.exit(main())
