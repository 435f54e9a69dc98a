"""The optimizer step alone, on the demo model's parameters: optim.Muon (batched Newton-Schulz)
+ AdamW against torch.optim.Muon + AdamW for the same matrices, with fused AdamW over everything
as the floor, side by side.

    python bench/bench_optim.py                 # tiny preset, the machine's threads
    python bench/bench_optim.py --threads 2 --rounds 5

Every side steps the same parameters with the same fixed gradients (a step's cost does not depend
on their values); the rounds alternate between the sides, so machine load hits all alike.
Printed: milliseconds per step (fastest round) and the ratio. optim.Muon runs Newton-Schulz in bf16
as torch.optim.Muon does (what the trainer picks when training in bf16) and, in a fourth row, in
fp32 (what it picks otherwise).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model import PRESETS, VLM, VLMConfig  # noqa: E402
from optim import build_optimizer, hidden_matrices  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = VLM(VLMConfig(**PRESETS[a.preset]))
    torch.manual_seed(0)
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-3
    hidden = {id(q) for q in hidden_matrices(model)}
    rest = [q for q in model.parameters() if id(q) not in hidden]
    mats = [q for q in model.parameters() if id(q) in hidden]
    sides = {"fused AdamW, all": [torch.optim.AdamW(model.parameters(), 1e-4, fused=True)],
             "torch.optim.Muon + AdamW": [torch.optim.AdamW(rest, 1e-4, fused=True), torch.optim.Muon(
                 mats, 1e-4, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")],
             "optim.Muon + AdamW": [build_optimizer("muon", model, None, 1e-4, 0.0, torch.device("cpu"), torch.bfloat16)],
             "optim.Muon (fp32) + AdamW": [build_optimizer("muon", model, None, 1e-4, 0.0, torch.device("cpu"))]}

    def run(opts, n):
        t = time.perf_counter()
        for _ in range(n):
            for o in opts:
                o.step()
        return (time.perf_counter() - t) / n * 1000

    best = {k: float("inf") for k in sides}
    for k, opts in sides.items():
        run(opts, 3)                                               # warm-up
    for _ in range(a.rounds):
        for k, opts in sides.items():
            best[k] = min(best[k], run(opts, a.steps))
    print(f"{a.preset}：{len(mats)} 个权重矩阵（{sum(q.numel() for q in mats) / 1e6:.2f}M / 共 "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M 参数），{torch.get_num_threads()} 个线程，"
          f"每边 {a.rounds} 轮 × {a.steps} 步取最快")
    print("| 优化器 | 毫秒/步 |\n| --- | ---: |")
    for k, ms in best.items():
        print(f"| {k} | {ms:.1f} |")
    ours, theirs = best["optim.Muon + AdamW"], best["torch.optim.Muon + AdamW"]
    print(f"optim.Muon 比 torch.optim.Muon 快 {theirs / ours:.2f} 倍；Muon 比只用 AdamW 每步多 "
          f"{ours - best['fused AdamW, all']:.1f} 毫秒")

if __name__ == "__main__":
    main()
