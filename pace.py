"""How fast a training run goes, told to the user: the machine's reference figure (its measured
matmul rate) at the start, an estimate of the training time after the first steps, and the time
actually taken at the end. The figure and the times also go into the training log, so runs on
two machines can be compared: per-step time over the reference figure says whether a machine is
just slower or the run differs.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from devices import matmul_rates

WARM_STEPS = 3          # the first steps set up kernels and memory: not counted in the rate
TIMED_STEPS = 10        # steps measured after those before the estimate is printed
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def epoch_bar(total: int, initial: int, desc: str, shown: bool) -> tqdm:
    """The progress bar of one epoch (batches done, time left in the epoch, loss and lr)."""
    return tqdm(total=total, initial=initial, desc=desc, bar_format=BAR, mininterval=0.5, dynamic_ncols=True,
                disable=not shown)


def reference_figure(device: torch.device, dtype) -> dict:
    """{"fp32": GFLOP/s, "<precision>": GFLOP/s}: a matmul measured on the training device, in fp32
    and in the precision the run computes in (well under a second on a CPU)."""
    dtypes = tuple(dict.fromkeys([torch.float32, dtype or torch.float32]))
    rates = matmul_rates(device, dtypes)
    return {NAMES[dt]: round(r, 1) for dt, r in rates.items()}


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} 分 {s} 秒" if m else f"{s} 秒"


class Pace:
    """Times the run's optimizer steps; only the process that is `shown` prints. `total_steps` is
    the whole run's; `val_batches` the validation samples still to score, in training batches
    (a forward pass is about a third of a training step's work)."""

    def __init__(self, total_steps: int, val_batches: float, shown: bool):
        self.total, self.val_share, self.shown = total_steps, val_batches / 3, shown
        self.start = self.t_warm = None
        self.first = self.eta = None
        self.machine = {}

    def begin(self, step: int, device: torch.device, dtype):
        """At the start of fit(): measure and print the reference figure."""
        self.machine = reference_figure(device, dtype)
        used = NAMES[dtype or torch.float32]
        rates = "，".join(f"{k} {v:g} GFLOP/s" for k, v in self.machine.items())
        self.say(f"本机参考算力（512×1024×1024 矩阵乘实测）：{rates}；本次训练用 {used}，{torch.get_num_threads()} 个线程")
        self.first, self.start = step, time.time()
        return self

    def step_done(self, step: int):
        """After each optimizer step: once enough steps are timed, print the estimate once."""
        done = step - self.first
        if done == WARM_STEPS:
            self.t_warm = time.time()
        elif done == WARM_STEPS + TIMED_STEPS and self.eta is None:
            per_step = (time.time() - self.t_warm) / TIMED_STEPS
            left = (self.total - step) + self.val_share
            self.eta = time.time() - self.start + left * per_step
            self.say(f"预计训练用时 {duration(self.eta)}（按第 {self.first + WARM_STEPS + 1}～{step} 步 "
                     f"{per_step:.2f} 秒/步估算，含每轮验证，不含训练后的评估）")

    def say(self, msg: str):
        if self.shown:
            tqdm.write(msg)                   # above the progress bar, which is redrawn below it

    def elapsed(self) -> float:
        return time.time() - self.start

    def record(self) -> dict:
        """For the training log: time since the start and the reference figure."""
        return {"elapsed_s": round(self.elapsed(), 1), "machine_gflops": self.machine}

    def finish(self):
        took = f"训练用时 {duration(self.elapsed())}"
        self.say(took + (f"（开始时预计 {duration(self.eta)}）" if self.eta is not None else ""))
