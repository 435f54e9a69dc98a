"""生成速度基准：本项目 VLM.generate() 与 transformers 的 generate()，同尺寸、同一组权重、同一进程内交替测量。

    .venv/bin/python bench/bench_generate.py
    .venv/bin/python bench/bench_generate.py --batches 1 8 --new-tokens 32

Greedy decoding of a prompt with one image (bos + text + 64 image tokens + text) at batch 1 and 8.
Both models hold the same weights (bench_train.copy_weights_to_hf), so they must produce the same
tokens — checked before timing. Reported: new tokens per second (all rows) and time to first
token (prompt encoding + first sampled token).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (BENCH_SIZES, PRECISIONS, autocast, build_pair, common_flags, emit, matmul_peak, peak_mib,  # noqa: E402
                         sync, train_flops_per_sample)
from model import VLMConfig  # noqa: E402

QUESTION = 8                    # text tokens after the image


def make_prompt(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(16, cfg.lm_vocab_size, (batch, k), generator=g)
    ids = torch.cat([torch.full((batch, 1), cfg.bos_token_id), text(7),
                     torch.full((batch, cfg.image_tokens), cfg.image_token_id), text(QUESTION)], 1)
    pixels = torch.randn(batch, 3, cfg.vit_image_size, cfg.vit_image_size, generator=g)
    return ids, pixels, torch.ones_like(ids)


def run_ours(model, prompt, new_tokens, device, dtype):
    """(tokens (B, n), seconds to the first token, total seconds)."""
    ids, pixels, mask = prompt
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    cols, first = [], None
    with autocast(device, dtype):
        for col in model.generate(ids, pixels, mask, max_new_tokens=new_tokens):
            cols.append(col)
            if first is None:
                sync(device)
                first = time.perf_counter() - t
    out = torch.stack(cols, 1)
    sync(device)
    return out, first, time.perf_counter() - t, time.process_time() - c


class FirstTokenTimer:
    """A transformers streamer that notes when the first new token arrives (put #2; #1 is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def run_hf(model, prompt, new_tokens, device, dtype):
    ids, pixels, mask = prompt
    sync(device)
    timer = FirstTokenTimer()
    with autocast(device, dtype):
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, streamer=timer, pad_token_id=model.config.text_config.pad_token_id)
    sync(device)
    return out[:, ids.shape[1]:], timer.first, time.perf_counter() - timer.t0, time.process_time() - timer.c0


def floor_seconds(model, batch, new_tokens, prompt_len, peak, device, dtype, reps=30):
    """A lower bound on the time of any implementation: reading the prompt at the measured matmul
    peak (forward FLOPs of vision + prompt), then per new token one pass of (batch, d) activations
    through every weight matrix of the language model and its output head, timed here. At batch 1
    that pass is memory-bound: each token has to stream all weights through the CPU once."""
    prompt_s = train_flops_per_sample(model.cfg, prompt_len, 1) / 3 * batch / peak
    mats = [m.weight for m in model.lm.modules() if isinstance(m, torch.nn.Linear)] + [model.lm.embed.weight]
    xs = [torch.randn(batch, w.shape[1], device=device, dtype=dtype or w.dtype) for w in mats]
    mats = [w.detach().to(x.dtype) for w, x in zip(mats, xs)]
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            for x, w in zip(xs, mats):
                torch.nn.functional.linear(x, w)
            sync(device)
            times.append(time.perf_counter() - t)
    per_token = statistics.median(times[reps // 3:])
    return prompt_s + (new_tokens - 1) * per_token, per_token, prompt_s


def measure_memory(which: str, batch: int, new_tokens: int, device: str, dtype) -> float:
    """Peak memory of one generate() call in MiB, weights excluded (image + prompt activations,
    KV cache, logits). Run in a fresh process per model so nothing is shared or reused."""
    ours, hf = build_pair(BENCH_SIZES)
    model = (ours if which == "ours" else hf).to(device).eval()
    del ours, hf
    prompt = tuple(t.to(device) for t in make_prompt(VLMConfig(**BENCH_SIZES), batch))
    run = run_ours if which == "ours" else run_hf
    return peak_mib(lambda: run(model, prompt, new_tokens, device, dtype), device)


def memory_in_child(which: str, batch: int, args) -> float:
    cmd = [sys.executable, __file__, "--memory-child", which, "--batches", str(batch), "--new-tokens",
           str(args.new_tokens), "--precision", args.precision, "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def bench_batch(ours, hf, batch, args):
    device, dtype = args.device, PRECISIONS[args.precision]
    prompt = tuple(t.to(device) for t in make_prompt(ours.cfg, batch))
    runners = {"ours": (ours, run_ours), "transformers": (hf, run_hf)}
    outs = {name: fn(m, prompt, args.new_tokens, device, dtype)[0] for name, (m, fn) in runners.items()}  # warm-up
    same = outs["ours"].shape == outs["transformers"].shape and bool((outs["ours"] == outs["transformers"]).all())
    stats = {k: {"tps": [], "ttft": [], "cpu": []} for k in runners}
    for _ in range(args.rounds):
        for name, (m, fn) in runners.items():
            out, first, total, cpu = fn(m, prompt, args.new_tokens, device, dtype)
            stats[name]["tps"].append(out.numel() / total)
            stats[name]["ttft"].append(first)
            stats[name]["cpu"].append(out.numel() / cpu)
    r = {"batch": batch, "new_tokens": outs["ours"].shape[1], "same_tokens": same}
    for name, s in stats.items():
        r[name] = {"tokens_per_s": round(statistics.median(s["tps"]), 1),
                   "ttft_ms": round(1000 * statistics.median(s["ttft"]), 1),
                   "all_rounds": [round(x, 1) for x in s["tps"]],
                   "tokens_per_cpu_s": round(statistics.median(s["cpu"]), 1)}
    r["speedup"] = round(r["ours"]["tokens_per_s"] / r["transformers"]["tokens_per_s"], 2)
    r["speedup_cpu_time"] = round(r["ours"]["tokens_per_cpu_s"] / r["transformers"]["tokens_per_cpu_s"], 2)
    r["ttft_speedup"] = round(r["transformers"]["ttft_ms"] / r["ours"]["ttft_ms"], 2)
    total, per_token, prompt_s = floor_seconds(ours, batch, r["new_tokens"], prompt[0].shape[1], args.peak, device, dtype)
    r["floor"] = {"per_token_ms": round(1000 * per_token, 3), "prompt_ms": round(1000 * prompt_s, 2),
                  "tokens_per_s": round(batch * r["new_tokens"] / total, 1)}
    r["floor"]["vs_transformers"] = round(r["floor"]["tokens_per_s"] / r["transformers"]["tokens_per_s"], 2)
    if not args.no_memory:
        for name, which in (("ours", "ours"), ("transformers", "hf")):
            r[name]["peak_mib"] = round(memory_in_child(which, batch, args), 1)
    return r


def run(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ours, hf = build_pair(BENCH_SIZES)
    ours, hf = ours.to(args.device).eval(), hf.to(args.device).eval()
    args.peak = matmul_peak(PRECISIONS[args.precision] or torch.float32, args.device)
    return {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
            "prompt_len": 1 + 7 + ours.cfg.image_tokens + QUESTION,
            "results": [bench_batch(ours, hf, b, args) for b in args.batches]}


def report(r):
    print(f"生成速度（{r['device']}，{r['precision']}，{r['threads']} 线程，提示长 {r['prompt_len']} token 含 1 张图，贪心解码）")
    for b in r["results"]:
        same = "两者输出相同" if b["same_tokens"] else "注意：两者输出不同"
        print(f"  batch {b['batch']}（每行 {b['new_tokens']} 个新 token，{same}）")
        for name in ("ours", "transformers"):
            m = b[name]
            mem = f"  峰值内存 {m['peak_mib']} MiB" if "peak_mib" in m else ""
            print(f"  {name:>12}: {m['tokens_per_s']:8.1f} token/秒（每 CPU 秒 {m['tokens_per_cpu_s']:.1f}）  "
                  f"首 token {m['ttft_ms']:7.1f} ms{mem}  各轮 {m['all_rounds']}")
        print(f"  加速比 本项目/transformers = {b['speedup']:.2f}×（按墙钟时间），{b['speedup_cpu_time']:.2f}×（按本进程 CPU 时间）；"
              f"首 token {b['ttft_speedup']:.2f}×")
        f = b["floor"]
        print(f"  上限：只做矩阵乘法——读提示按实测峰值 {f['prompt_ms']} ms，之后每个 token 让语言模型的每个权重矩阵"
              f"各过一遍 {f['per_token_ms']} ms（实测）——最多 {f['tokens_per_s']} token/秒，即 transformers 的 {f['vs_transformers']:.2f}×")


def main(argv=None):
    p = argparse.ArgumentParser(description="生成速度：本项目 vs transformers generate()（同尺寸、同权重）。")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="要测的批次大小 (默认: 1 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="每行生成的新 token 数 (默认: 32)")
    p.add_argument("--rounds", type=int, default=5, help="交替测量的轮数，取中位数 (默认: 5)")
    common_flags(p)
    p.add_argument("--json", action="store_true", help="只输出 JSON")
    p.add_argument("--out", help="另把结果存成 JSON 文件")
    p.add_argument("--no-memory", action="store_true", help="不测峰值内存（省去每个 batch 两个子进程）")
    p.add_argument("--memory-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        peak = measure_memory(args.memory_child, args.batches[0], args.new_tokens, args.device, PRECISIONS[args.precision])
        print(json.dumps({"peak_mib": peak}))
        return
    emit(run(args), args, report)


if __name__ == "__main__":
    main()
