"""What this machine offers a run: the device (--device), the precision it computes fast in
(--precision), and how many processes should decode data (--workers)."""
from __future__ import annotations

import functools
import os
import time

import torch

from errors import UserError
from memory import drop_file_pages, unwritten_file_mappings
from lean import frozen_lean


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"无法识别的设备 {name!r}（可用 auto、cpu、cuda、cuda:0 …）。") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"指定的设备 {name} 不可用：这台机器没有可用的 CUDA GPU。请改用 --device cpu 或 auto。")
    return dev


def autocast_dtype(device: torch.device, precision: str):
    """None = plain fp32. auto: bf16 on GPUs that have it (else fp16); on a CPU, bf16 only if
    it is measurably faster there (AMX makes it ~9x faster; without AMX it is ~2x slower)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_speedup() > 1.2 else None


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of the same matmul on this CPU (matmul_rates, a ~0.2 s measurement)."""
    rates = matmul_rates(torch.device("cpu"), (torch.float32, torch.bfloat16))
    return rates[torch.bfloat16] / rates[torch.float32]


@functools.cache
def matmul_rates(device: torch.device, dtypes: tuple, rounds: int = 5) -> dict:
    """{dtype: GFLOP/s} of a 512x1024 @ 1024x1024 matmul on `device`: what --precision auto decides
    by, and the machine's reference figure a training run prints and logs. The dtypes take turns,
    round by round, and each keeps its best round: a moment when a shared machine is busy then slows
    them alike instead of one alone (timed one after the other, a 2-core VM once measured bf16 no
    faster than fp32 and trained a demo in fp32, twice as slow; docs/training.md)."""
    timers = {dt: matmul_timer(dt, device) for dt in dtypes}
    best = dict.fromkeys(dtypes, 0.0)
    for _ in range(rounds):
        for dt, timer in timers.items():
            best[dt] = max(best[dt], timer())
    return best


def matmul_timer(dtype, device, n: int = 1024, reps: int = 3, m: int = 512):
    """A function that times `reps` (m x n) @ (n x n) matmuls in `dtype` (after one warm-up) and
    returns their GFLOP/s."""
    g = torch.Generator().manual_seed(0)          # leaves the global generator (a run's seed) alone
    a, b = (torch.randn(r, n, generator=g).to(device, dtype) for r in (m, n))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b

    def timed() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return 2 * m * n * n * reps / (time.perf_counter() - t) / 1e9
    return timed


def matmul_rate(dtype, device, n: int = 1024, reps: int = 3, m: int = 512) -> float:
    """GFLOP/s of an (m x n) @ (n x n) matmul in `dtype`, best of 3 rounds of `reps` (after one warm-up)."""
    timed = matmul_timer(dtype, device, n, reps, m)
    return max(timed() for _ in range(3))


def default_workers() -> int:
    """On small machines the main process decodes as fast as a worker and doesn't compete."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(8, cpus // 2)


def store_frozen_in(model: torch.nn.Module, dtype) -> int:
    """Keep frozen weight matrices in the compute dtype (bf16/fp16); trainable parameters stay
    fp32, and so do norms and biases (tiny; a CPU layer norm wants them in its input's fp32). Under
    autocast a frozen fp32 weight is cast again on every forward and the cast copy is kept for the
    backward beside the original (6 bytes per parameter); stored in bf16 it is used as it is (2).
    Everything else is copied too, so no tensor still points into a memory-mapped weights file
    (transformers maps safetensors), and each one's file pages leave as soon as it is copied: the
    fp32 file and the bf16 copy are never resident together. The frozen decoder blocks also keep
    less for the backward from here on (lean.frozen_lean). Returns the parameters converted."""
    n, mapped = 0, unwritten_file_mappings()
    for t in [*model.parameters(), *model.buffers()]:
        cast = isinstance(t, torch.nn.Parameter) and not t.requires_grad and t.ndim >= 2 and t.is_floating_point()
        old = t.data
        t.data = old.to(dtype, copy=True) if cast else old.clone()
        drop_file_pages(old, mapped)
        n += t.numel() if cast else 0
    frozen_lean(model)
    return n
