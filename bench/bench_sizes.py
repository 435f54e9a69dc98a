"""GPU 规模检查：`small` 预设与“CLIP-B/16 视觉塔 + 0.5B Qwen2 尺寸语言模型”在 batch 4/8/16 下的
训练吞吐、MFU 与峰值显存（随机权重，按配置构建，不下载任何东西）。由 bench/gpu.sh 调用。

    .venv/bin/python bench/bench_sizes.py                 # GPU：完整检查
    .venv/bin/python bench/bench_sizes.py --smoke         # CPU：同样的代码路径，层数减为 1、词表至多 4096，几十秒

Each row: our VLM (and, unless --no-hf, transformers' LLaVA with the same shapes and weights)
trained with AdamW under bf16 autocast on one batch of [bos, 7 text, <image>xN, 24 answer] tokens.
MFU is against a bf16 matmul measured in the same run; model FLOPs are counted once (logits
only where a label is) and used for both rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (ANSWER, PRECISIONS, build_pair, hf_step, make_batch, matmul_peak, measure_memory,  # noqa: E402
                         optimizer, ours_step, sync, train_flops_per_sample)
from model import PRESETS, VLMConfig  # noqa: E402

SPECIAL = dict(image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = {
    "tiny": {**PRESETS["tiny"], **SPECIAL},           # the CPU demo
    "small": {**PRESETS["small"], **SPECIAL},
    # CLIP ViT-B/16 at 224 px (196 patches) + a Qwen2-0.5B-shaped decoder (GQA 14/2, tied 151936 vocab)
    "clip-b16+qwen2-0.5b": dict(vit_image_size=224, vit_patch_size=16, vit_dim=768, vit_layers=12, vit_heads=12,
                                lm_vocab_size=151936, lm_dim=896, lm_layers=24, lm_heads=14, lm_kv_heads=2,
                                lm_hidden=4864, lm_max_len=1024, lm_rope_theta=1e6, lm_norm_eps=1e-6, **SPECIAL),
}


def measure(models, batch, args, dtype, peak):
    """{name: {samples_per_s, mfu, peak_mib}} for each (model, step) in `models`, fresh optimizer each."""
    device = args.device
    cfg = models["ours"][0].cfg
    data = tuple(t.to(device) for t in make_batch(cfg, batch))
    flops = train_flops_per_sample(cfg, data[0].shape[1], ANSWER)
    out = {}
    for name, (model, step) in models.items():
        opt = optimizer(model, device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(args.warmup):
                step(model, opt, data, device, dtype)
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, data, device, dtype)
            sync(device)
        except torch.OutOfMemoryError:
            out[name] = {"error": "OOM"}
            continue
        finally:
            del opt
            model.zero_grad(set_to_none=True)
            gc.collect()
        rate = batch * args.steps / (time.perf_counter() - t)
        row = {"samples_per_s": round(rate, 1), "mfu": round(rate * flops / peak, 4)}
        if device.startswith("cuda"):
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
        elif args.cpu_memory:
            row["peak_mib"] = cpu_memory_in_child(args.size_name, batch, name, args.precision)
        out[name] = row
    return out, flops


def cpu_memory_in_child(size: str, batch: int, which: str, precision: str) -> int:
    """Training-step memory on a CPU, measured in a fresh process (see bench_train.measure_memory)."""
    cmd = [sys.executable, __file__, "--memory-child", size, str(batch), "ours" if which == "ours" else "hf",
           "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return round(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def main(argv=None):
    p = argparse.ArgumentParser(description="GPU 规模检查：两种尺寸 × batch 4/8/16 的训练吞吐、MFU、峰值显存。")
    p.add_argument("--smoke", action="store_true", help="CPU 冒烟：层数减为 1、词表至多 4096、batch 1、各 1 步，只验证代码能跑通")
    p.add_argument("--device", default=None, help="设备 (默认: 有 GPU 用 cuda，--smoke 用 cpu)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="批次大小 (默认: 4 8 16)")
    p.add_argument("--steps", type=int, default=10, help="计时步数 (默认: 10)")
    p.add_argument("--warmup", type=int, default=3, help="预热步数 (默认: 3)")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS), help="autocast 精度 (默认: bf16)")
    p.add_argument("--no-hf", action="store_true", help="只测本项目模型")
    p.add_argument("--out", help="把结果另存为 JSON 文件")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None, help="只测这些尺寸 (默认: 全部)")
    p.add_argument("--cpu-memory", action="store_true", help="在 CPU 上也测峰值内存（每行一个子进程）")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        size, batch, which = args.memory_child
        peak = measure_memory(which, SIZES[size], int(batch), "cpu", PRECISIONS[args.precision])
        print(json.dumps({"peak_mib": peak}))
        return
    if args.smoke:
        args.device = args.device or "cpu"
        args.batches = args.batches or [1]
        args.steps, args.warmup = 1, 1
        args.precision = "fp32" if args.precision == "bf16" else args.precision
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batches = args.batches or [4, 8, 16]
    dtype = PRECISIONS[args.precision]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(dtype or torch.float32, args.device, n=8192 if args.device.startswith("cuda") else 512)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"设备 {name}，精度 {args.precision}，同精度 matmul 实测峰值 {peak / 1e12:.3g} TFLOP/s", flush=True)
    results = {"device": name, "precision": args.precision, "matmul_tflops": round(peak / 1e12, 2), "rows": []}
    for size, sizes in SIZES.items():
        if args.sizes and size not in args.sizes:
            continue
        args.size_name = size
        if args.smoke:                  # the same shapes, one layer each and a small vocabulary
            sizes = {**sizes, "vit_layers": 1, "lm_layers": 1,
                     "lm_vocab_size": min(sizes.get("lm_vocab_size", 4096), 4096)}
        t = time.perf_counter()
        ours, hf = build_pair(sizes)
        n_params = sum(p.numel() for p in ours.parameters())
        models = {"ours": (ours.to(args.device).train(), ours_step)}
        if not args.no_hf:
            models["transformers"] = (hf.to(args.device).train(), hf_step)
        del hf
        print(f"{size}: {n_params / 1e6:.0f}M 参数{'（冒烟：各 1 层）' if args.smoke else ''}，构建 "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for batch in args.batches:
            t = time.perf_counter()
            rows, flops = measure(models, batch, args, dtype, peak)
            results["rows"].append({"size": size, "params_m": round(n_params / 1e6), "batch": batch,
                                    "gflop_per_sample": round(flops / 1e9, 1), **rows})
            line = "  ".join(f"{k}: {v['samples_per_s']} 样本/秒, MFU {v['mfu']:.1%}, 峰值 {v.get('peak_mib', '-')} MiB"
                             if "error" not in v else f"{k}: {v['error']}" for k, v in rows.items())
            print(f"  batch {batch:>2}: {line}  ({time.perf_counter() - t:.0f} s)", flush=True)
        del models, ours
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
