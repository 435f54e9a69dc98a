"""Data-parallel training under torchrun: which process this is, joining the process group, each
rank's share of a batch order, start-up work done once on rank 0, and summing a few numbers over
all ranks. A plain `python` run is rank 0 of 1 and never touches torch.distributed."""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from errors import UserError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain `python` run."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def say(msg: str):
    """Print once per run: under torchrun only rank 0 speaks."""
    if dist_env()[0] == 0:
        print(msg, flush=True)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs). Each rank on a machine gets
    the GPU of its LOCAL_RANK, whatever cuda:N was asked for."""
    rank, world, local = dist_env()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"本机只有 {torch.cuda.device_count()} 块 GPU，却启动了第 {local + 1} 个进程。"
                            f"请让 --nproc_per_node 不超过 GPU 数。")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 alone evaluates and writes checkpoints at epoch ends while the others wait in
        # their next all-reduce: allow that an hour instead of NCCL's default 10 minutes
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
        # left to interpreter shutdown, gloo's worker threads can abort the process at exit
        # ("terminate called without an active exception"): take the group down while Python lives
        atexit.register(leave_group)
    return rank, world, device


def leave_group():
    """Destroy the process group if one is still up (registered to run at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_keys(order: list, batch: int, world: int, rank: int, accum: int = 1) -> list:
    """Rank `rank`'s share of `order`: the rank-th slice of each global batch (batch x world),
    whole optimizer steps only (accum global batches), so all ranks get the same count."""
    step = batch * world * accum
    order = order[:len(order) // step * step]
    return [k for s in range(0, len(order), batch * world) for k in order[s + rank * batch:s + (rank + 1) * batch]]


def on_rank0(compute):
    """compute() on rank 0 alone and its result (pickled) on every rank: start-up work such as
    checking every image is done once per run, not once per process. Without a process group
    (a plain run) compute() runs here. An exception on rank 0 is raised on every rank, so none
    waits for a result that will not come."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, compute())]
        except Exception as e:                 # handed to every rank and raised there
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def all_reduce(values: list[float], world: int, device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) of a few numbers over all ranks; the numbers themselves on one process."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()
