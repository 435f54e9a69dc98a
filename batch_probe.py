"""--batch-size auto: the largest batch per process that fits, found by a short probe before training.

The probe runs the real training step (forward and backward, no optimizer step) on batches made
of the longest of the first samples, at batch sizes 1, 2, 4, ... until one does not fit or the cap
is reached, then bisects between the last that fitted and the first that did not. What "fits" means:
- on a GPU: the step runs without torch.OutOfMemoryError while memory for AdamW's two moments is
  held back (they are allocated at the first real step);
- on a CPU (where running out of memory kills the process instead of raising): the tensors the
  step keeps for its backward, twice over for the backward's own, plus AdamW's moments, stay
  within 80 % of the memory available (MemAvailable in /proc/meminfo, shared by this machine's ranks).
Under torchrun every rank probes alone (no gradient communication) and all take the smallest result.
A resumed run keeps the batch size of its resume state.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from checkpoint import resume_path
from distributed import say
from errors import UserError

CAPS = {"cpu": 64, "cuda": 512}           # larger batches than these gain a CPU nothing, a GPU little
SHARE = 0.8                               # of the available CPU memory a probe may plan to use
SAMPLES = 32                              # the longest of this many first samples makes the probe's batches


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest batch size in 1..cap for which fits() holds, 0 if none; fits must be monotone
    (every batch smaller than one that fits fits too). Doubling from 1, then bisecting."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while good < cap:
        size = min(2 * good, cap)
        if not fits(size):
            bad = size
            break
        good = size
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def resolve_batch(trainer) -> int:
    """The trainer's batch size: as given, or for "auto" the saved one when resuming, else the probe's."""
    cfg = trainer.cfg
    if cfg.batch_size != "auto":
        return cfg.batch_size
    if cfg.fsdp and trainer.world > 1:
        raise UserError("--batch-size auto 暂不能和 --fsdp 一起用（探测时一个进程显存不足会让其他进程一直等待）。"
                        "请给出具体的 --batch-size。")
    saved = saved_batch(cfg.output) if cfg.resume else None
    if saved is not None:
        say(f"--batch-size auto：按断点里记录的批次 {saved} 继续训练。")
        return saved
    cap = CAPS.get(trainer.device.type, CAPS["cpu"])
    sample = longest_sample(trainer)
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        fits = device_fits(trainer, sample) if trainer.device.type == "cuda" else memory_fits(trainer, sample, cpu_budget())
        size = largest_fitting(fits, cap)
    if trainer.world > 1:                    # every rank must use the same batch
        size = int(trainer.all_reduce([size], dist.ReduceOp.MIN)[0])
    if size == 0:
        raise UserError("--batch-size auto：批次为 1 也放不下（显存或内存不够）。请换小一些的模型，"
                        "或用 --gradient-checkpointing / --fsdp，或关掉占内存的其他程序。")
    say(f"--batch-size auto：每个进程的批次定为 {size}（" + (f"已到上限 {cap}" if size == cap else "再大就放不下了") + "）。")
    return size


def saved_batch(output: str) -> int | None:
    """The per-process batch size in the resume state beside `output`, None without one (or if it
    cannot be read: loading it later says why). Memory-mapped: the weights are not read."""
    path = resume_path(output)
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["train_config"]["batch_size"])
    except Exception:  # noqa: BLE001 - no file, or one that load_resume will refuse with its own message
        return None


def longest_sample(trainer):
    """The longest (in tokens) of the first SAMPLES training samples: batches of it are the largest
    the data makes (padding goes to the longest row)."""
    data = trainer.train_data
    keys = [(0, i) if getattr(data, "epoch_keys", False) else i for i in range(min(SAMPLES, len(data)))]
    items = [data[k] for k in keys]
    return max(items, key=lambda item: trainer.collate([item])["input_ids"].shape[1])


def step(trainer, sample, size: int):
    """Forward and backward of a batch of `size` copies of `sample`, gradients dropped after; no
    gradient communication under DDP (each rank probes alone)."""
    batch = trainer.to_device(trainer.collate([sample] * size))
    trainer.model.train()
    quiet = trainer.net.no_sync() if trainer.world > 1 else contextlib.nullcontext()
    try:
        with quiet:
            loss, _ = trainer.loss(batch)
            loss.backward()
    finally:
        trainer.opt.zero_grad(set_to_none=True)


def optimizer_bytes(trainer) -> int:
    """AdamW's two moments for every trained parameter (allocated at the first step)."""
    return 2 * sum(p.numel() * p.element_size() for g in trainer.opt.param_groups for p in g["params"])


def device_fits(trainer, sample) -> Callable[[int], bool]:
    """fits(size) on a GPU: the step runs without running out of memory, AdamW's moments held back."""
    def fits(size: int) -> bool:
        reserve = torch.empty(optimizer_bytes(trainer), dtype=torch.uint8, device=trainer.device)
        try:
            step(trainer, sample, size)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        del reserve
        torch.cuda.empty_cache()
        return ok
    return fits


def memory_fits(trainer, sample, budget: int | None) -> Callable[[int], bool]:
    """fits(size) on a CPU: step_bytes() within `budget` bytes (None: no limit, the cap decides)."""
    return lambda size: budget is None or step_bytes(trainer, sample, size) <= budget


def step_bytes(trainer, sample, size: int) -> int:
    """The memory a step of `size` needs beyond the weights: what it keeps for its backward
    (parameters excluded: they are in memory already), twice over for the backward's own
    temporaries, plus AdamW's moments."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(trainer, sample, size)
    return 2 * sum(kept.values()) + optimizer_bytes(trainer)


def cpu_budget() -> int | None:
    """SHARE of the memory available now (MemAvailable), split between this machine's ranks; None
    where the system does not say."""
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return int(SHARE * available / int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
