"""训练时的内存峰值：冻结的 Hugging Face 语言模型（约 3 亿参数，Llama 结构，随机权重，按配置构建）
+ 小 CLIP，`--precision bf16 --train projector`，只存改动部分（delta）。三种做法各跑一次，每次一个独立进程：
  改动前   冻结的底座以 fp32 保存，指纹先把整个张量复制成 float64 再求和（旧代码）；
  fp32     冻结的底座仍以 fp32 保存，指纹分块求和（单看 bf16 保存省了多少）；
  改动后   冻结的底座以 bf16 保存（devices.store_frozen_in，转换时逐个放开映射文件的页，memory.py），
           冻结的解码层只给反向留必需的张量（lean.py），指纹分块求和。
报告整个进程的峰值 RSS（加载 + 训练）、其中训练阶段的峰值，以及“改动后 / 改动前”之比。

    .venv/bin/python bench/bench_memory.py              # 约 3 亿参数，几分钟
    .venv/bin/python bench/bench_memory.py --smoke      # 小模型，几十秒，只验证脚本能跑通

Each run: the real Trainer (trainer.py) on synthetic scenes for --steps optimizer steps; the child's
VmHWM (peak resident set) is read after loading, reset (/proc/self/clear_refs) and read again
after training; the run's peak is the larger of the two.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# head_dim = hidden / heads, as in Llama (the tiny test config's head_dim of 8 would otherwise stay)
LLAMA_300M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=64, vocab_size=32000)
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=16, vocab_size=1000)


def save_llama(path: Path, shape: dict) -> int:
    """tiny_hf's Llama folder (its tokenizer and template), the model replaced by one of `shape`."""
    import torch
    import tiny_hf
    from transformers import LlamaConfig, LlamaForCausalLM
    tiny_hf.save_llama(path)
    old = LlamaConfig.from_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**old.to_dict(), **shape, "torch_dtype": "float32"}))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


RUNS = {"before": "改动前", "fp32": "fp32 底座 + 其余改动", "after": "改动后"}


def child(folder: str, steps: int, way: str):
    """One training run in this process, the way `way` (a key of RUNS); prints its peak RSS as JSON."""
    import backbones
    import checkpoint
    import scenes
    import trainer
    from collate import Collator
    if way != "after":                                               # the frozen base stays fp32
        trainer.store_frozen_in = lambda model, dtype: 0
    if way == "before":                                              # fingerprints summed whole
        checkpoint.SUM_CHUNK = 2 ** 62
    model, tok = backbones.build_vlm(str(Path(folder) / "clip"), str(Path(folder) / "llama"))
    backbones.configure_training(model, "projector", 1e-3)
    data = scenes.SceneDataset(4 * steps, "train", 0, "en", model.cfg.vit_image_size)
    cfg = trainer.TrainConfig(epochs=1, batch_size=4, lr=1e-3, output=str(Path(folder) / f"{way}.pt"),
                              precision="bf16", workers=0, feature_cache_gb=0)
    run = trainer.Trainer(model, tok, data, Collator(tok, model.cfg), cfg, meta={"weights": "delta"},
                          log=lambda *a: None)
    loading = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")                    # the peak from here on: training
    run.fit()
    training = peak_rss_mb()
    print(json.dumps({"loading_peak_mb": loading, "training_peak_mb": training, "peak_mb": max(loading, training)}))


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="小模型，只验证脚本能跑通")
    p.add_argument("--steps", type=int, default=3, help="每次训练的步数 (默认: 3)")
    p.add_argument("--out", help="把结果另存为 JSON")
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "WAY"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.steps, a.child[1])
    import tiny_hf
    with tempfile.TemporaryDirectory() as d:
        tiny_hf.save_clip(Path(d) / "clip")
        params = save_llama(Path(d) / "llama", LLAMA_SMOKE if a.smoke else LLAMA_300M)
        runs = {}
        for way in RUNS:
            out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", d, way],
                                 capture_output=True, text=True, check=True)
            runs[way] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = runs["after"]["peak_mb"] / runs["before"]["peak_mb"]
    print(f"冻结的语言模型 {params / 1e6:.0f}M 参数 + 小 CLIP，bf16，只训练投影层，{a.steps} 步（峰值 RSS）：")
    for way, r in runs.items():
        print(f"  {RUNS[way]}：{r['peak_mb']:.0f} MB（加载时 {r['loading_peak_mb']:.0f} MB，训练时 {r['training_peak_mb']:.0f} MB）")
    print(f"  改动后 / 改动前 = {ratio:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"params": params, "runs": runs, "ratio": ratio}, ensure_ascii=False))


if __name__ == "__main__":
    main()
