"""训练时的内存峰值：冻结的 Hugging Face 语言模型（约 3 亿参数，Llama 结构，随机权重，按配置构建）
+ 小 CLIP，`--precision bf16 --train projector`，只存改动部分（delta）。冻结的底座以 fp32 保存（旧做法）
与以 bf16 保存（devices.store_frozen_in）各跑一次，每次一个独立进程，报告训练时的峰值 RSS 和两者之比
（另报加载模型时的峰值：它发生在训练之前，这项改动不影响它）。

    .venv/bin/python bench/bench_memory.py              # 约 3 亿参数，几分钟
    .venv/bin/python bench/bench_memory.py --smoke      # 小模型，几十秒，只验证脚本能跑通

Each run: the real Trainer (trainer.py) on synthetic scenes for --steps optimizer steps; the child's
VmHWM (peak resident set) is read after loading, reset (/proc/self/clear_refs) and read again
after training.
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

LLAMA_300M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000)
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1000)


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


def child(folder: str, steps: int, keep_fp32: bool):
    """One training run in this process; prints its peak RSS as JSON."""
    import backbones
    import scenes
    import trainer
    from collate import Collator
    if keep_fp32:                                                    # the code before store_frozen_in
        trainer.store_frozen_in = lambda model, dtype: 0
    model, tok = backbones.build_vlm(str(Path(folder) / "clip"), str(Path(folder) / "llama"))
    backbones.configure_training(model, "projector", 1e-3)
    data = scenes.SceneDataset(4 * steps, "train", 0, "en", model.cfg.vit_image_size)
    cfg = trainer.TrainConfig(epochs=1, batch_size=4, lr=1e-3, output=str(Path(folder) / f"m{int(keep_fp32)}.pt"),
                              precision="bf16", workers=0, feature_cache_gb=0)
    run = trainer.Trainer(model, tok, data, Collator(tok, model.cfg), cfg, meta={"weights": "delta"},
                          log=lambda *a: None)
    loading = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")                    # the peak from here on: training
    run.fit()
    print(json.dumps({"loading_peak_mb": loading, "training_peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="小模型，只验证脚本能跑通")
    p.add_argument("--steps", type=int, default=3, help="每次训练的步数 (默认: 3)")
    p.add_argument("--out", help="把结果另存为 JSON")
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "KEEP_FP32"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.steps, a.child[1] == "1")
    import tiny_hf
    with tempfile.TemporaryDirectory() as d:
        tiny_hf.save_clip(Path(d) / "clip")
        params = save_llama(Path(d) / "llama", LLAMA_SMOKE if a.smoke else LLAMA_300M)
        runs = {}
        for keep in (True, False):
            out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", d, str(int(keep))],
                                 capture_output=True, text=True, check=True)
            runs["fp32" if keep else "bf16"] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = runs["bf16"]["training_peak_mb"] / runs["fp32"]["training_peak_mb"]
    print(f"冻结的语言模型 {params / 1e6:.0f}M 参数 + 小 CLIP，bf16，只训练投影层，{a.steps} 步（峰值 RSS）：")
    for name, r in runs.items():
        print(f"  冻结底座存为 {name}：训练 {r['training_peak_mb']:.0f} MB（加载时 {r['loading_peak_mb']:.0f} MB）")
    print(f"  训练峰值之比 {ratio:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"params": params, "runs": runs, "ratio": ratio}, ensure_ascii=False))


if __name__ == "__main__":
    main()
