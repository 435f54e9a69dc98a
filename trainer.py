"""The one training loop both training scripts call.

AdamW (no decay on norms/biases) -> linear warmup + cosine decay -> bf16 autocast (fp16 +
GradScaler where bf16 is missing) -> gradient accumulation and clipping -> non-finite steps
skipped -> validation each epoch -> best checkpoint by validation loss -> resume state beside it.

Data order is a pure function of (seed, epoch), so a resumed run replays exactly the batches an
uninterrupted run would have seen and ends with the same weights.

Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel: NCCL on GPUs, gloo on CPUs;
each rank takes its own slice of every global batch of the epoch's order (batch-size x processes
samples), so all ranks make the same number of steps; accumulation micro-batches skip the
all-reduce (no_sync); only rank 0 prints, logs and writes files. Resume state records the samples
consumed in the epoch, so a run may continue on a different number of processes. Datasets whose items change
per epoch (a fresh question, another of five captions) set `epoch_keys = True` and receive
(epoch, index) keys instead of plain indices, which also works with persistent workers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (RESUME_FORMAT, VERSION, atomic_save, check_writable, checkpoint_dict, read_file, restore_weights,
                        resume_path, save_checkpoint)
from errors import UserError

BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    min_lr_ratio: float = 0.1        # cosine ends at lr * this
    warmup: float = 0.03             # share of all optimizer steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accum: int = 1                   # micro-batches per optimizer step
    device: str = "auto"
    precision: str = "auto"          # auto | bf16 | fp16 | fp32
    seed: int = 0
    output: str = "checkpoints/vision_trained_model.pt"
    resume: bool = False
    workers: int = -1                # -1: sized to the machine
    save_every: int = 200            # optimizer steps between resume-state saves
    max_bad_steps: int = 20          # consecutive non-finite steps before giving up
    aux_weight: float = 1.0
    compile: bool = False            # torch.compile the training step
    feature_cache_gb: float = 2.0    # CPU memory for a frozen vision encoder's features (0 = off)

    def validate(self):
        checks = [(self.epochs >= 1, "--epochs 必须是正整数"), (self.batch_size >= 1, "--batch-size 必须是正整数"),
                  (self.lr > 0 and math.isfinite(self.lr), "--lr 必须是大于 0 的数"),
                  (self.accum >= 1, "--grad-accum 必须是正整数"), (self.save_every >= 1, "--save-every 必须是正整数"),
                  (0 <= self.warmup < 1, "--warmup 必须在 [0, 1) 之间"),
                  (self.precision in ("auto", "bf16", "fp16", "fp32"), "--precision 只能是 auto/bf16/fp16/fp32"),
                  (self.feature_cache_gb >= 0, "--feature-cache-gb 不能是负数")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg + "。")


def add_train_flags(p: argparse.ArgumentParser, batch_size: int, epochs: int, lr: float):
    """Flags both training scripts share (the guide's core flags first)."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"批次大小 (默认: {batch_size})")
    p.add_argument("--epochs", type=int, default=epochs, help=f"训练轮数 (默认: {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"学习率 (默认: {lr:g})")
    p.add_argument("--checkpoint", help="基础模型路径：从这个检查点继续训练（默认从头训练）")
    p.add_argument("--output", default="checkpoints/vision_trained_model.pt",
                   help="输出模型路径 (默认: checkpoints/vision_trained_model.pt)")
    p.add_argument("--resume", action="store_true", help="从输出路径旁的断点文件（*.resume.pt）继续上次中断的训练")
    p.add_argument("--seed", type=int, default=0, help="随机种子 (默认: 0)")
    p.add_argument("--device", default="auto", help="设备: auto / cpu / cuda / cuda:N (默认: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="计算精度 (默认: auto = bf16，不支持 bf16 的 GPU 用 fp16)")
    p.add_argument("--grad-accum", type=int, default=1, help="梯度累积步数 (默认: 1)")
    p.add_argument("--warmup", type=float, default=0.03, help="预热占总步数的比例 (默认: 0.03)")
    p.add_argument("--workers", type=int, default=-1, help="数据加载进程数 (默认: 按机器自动)")
    p.add_argument("--save-every", type=int, default=200, help="每多少步保存一次断点 (默认: 200)")
    p.add_argument("--feature-cache-gb", type=float, default=2.0,
                   help="视觉编码器冻结时（如 --train projector / lora），在 CPU 上把每张图的特征算一次后留在内存里，"
                        "之后各轮不再过编码器；最多占这么多 GB，0 表示不缓存 (默认: 2)")
    p.add_argument("--compile", action="store_true",
                   help="用 torch.compile 编译训练步：首次编译要几十秒到几分钟，之后每步更快（见 docs/benchmarks.md）")


def config_from_args(a) -> TrainConfig:
    return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, device=a.device,
                       precision=a.precision, seed=a.seed, output=a.output, resume=a.resume,
                       accum=a.grad_accum, warmup=a.warmup, workers=a.workers, save_every=a.save_every,
                       compile=getattr(a, "compile", False), feature_cache_gb=getattr(a, "feature_cache_gb", 2.0))


class FeatureCache:
    """Installed as a frozen vision encoder's forward: each distinct image's features are
    computed once and kept (up to `budget` bytes), so later epochs skip the encoder. Images are
    told apart by a hash of their preprocessed pixels, so no data set has to cooperate; an image
    that changes (augmentation) is simply a new entry. CPU only: on a GPU the encoder is cheap
    and hashing would copy every batch to the host."""

    def __init__(self, tower: torch.nn.Module, budget: float):
        self.tower, self.budget, self.used = tower, budget, 0
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.full = False                        # some features did not fit and are recomputed
        self.encode = tower.forward
        tower.forward = self                     # Module.__call__ (and its hooks) now come here

    def remove(self):
        del self.tower.forward
        self.store.clear()

    def __call__(self, pixels):
        keys = [hashlib.blake2b(p.contiguous().numpy(), digest_size=16).digest() for p in pixels.detach()]
        todo = {}                                       # key -> first image with it, if not stored
        for i, k in enumerate(keys):
            if k not in self.store:
                todo.setdefault(k, i)
        fresh = dict(zip(todo, self.encode(pixels[list(todo.values())]))) if todo else {}
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        for k, f in fresh.items():
            if self.used + f.nbytes > self.budget:
                self.full = True
                continue
            self.store[k] = f.clone()                   # its own memory, not a view of the batch
            self.used += f.nbytes
        return torch.stack([fresh[k] if k in fresh else self.store[k] for k in keys])


class TrainingInterrupted(Exception):
    """Raised after resume state was saved on SIGINT/SIGTERM."""


def lr_at(step: int, total: int, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from peak/warmup to peak, then cosine from peak to peak*min_ratio at `total`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 512x1024x1024 matmul on this CPU (a ~0.1 s measurement)."""
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(512, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        times[dt] = time.perf_counter() - t
    return times[torch.float32] / times[torch.bfloat16]


def default_workers() -> int:
    """On small machines the main process decodes as fast as a worker and doesn't compete."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(8, cpus // 2)


# ----------------------------------------------------------------------------- distributed

def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain `python` run."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


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
    return rank, world, device


def rank_keys(order: list, batch: int, world: int, rank: int, accum: int = 1) -> list:
    """Rank `rank`'s share of `order`: the rank-th slice of each global batch (batch x world),
    whole optimizer steps only (accum global batches), so all ranks get the same count."""
    step = batch * world * accum
    order = order[:len(order) // step * step]
    return [k for s in range(0, len(order), batch * world) for k in order[s + rank * batch:s + (rank + 1) * batch]]


class EpochKeys(torch.utils.data.Sampler):
    """The keys of the current pass, replaced before each pass, so one DataLoader and its
    persistent workers serve every epoch (no worker start-up per epoch)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class TrainStep(torch.nn.Module):
    """The model and its optional auxiliary head as one module, so a single DDP wrapper averages
    the gradients of both. Returns (loss to optimise, language-model loss to show)."""

    def __init__(self, model, aux, aux_weight: float):
        super().__init__()
        self.model, self.aux, self.aux_weight = model, aux, aux_weight

    def forward(self, batch):
        lm_loss, _ = self.model(batch["input_ids"], batch["pixels"], batch["labels"])
        loss = lm_loss if self.aux is None else lm_loss + self.aux_weight * self.aux(batch)
        return loss, lm_loss


def param_groups(modules, weight_decay: float):
    """No weight decay on 1-D parameters (norms, biases, CLS). A parameter's `lr_scale` attribute
    (set by backbones.configure_training, default 1) multiplies its learning rate."""
    groups = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                groups.setdefault((p.ndim < 2, getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": groups.get((nd, s), []), "weight_decay": 0.0 if nd else weight_decay, "lr_scale": s}
            for s in sorted({s for _, s in groups} | {1.0}, reverse=True) for nd in (False, True)]


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    def __init__(self, model, tokenizer, train_data, collate, cfg: TrainConfig, val_data=None,
                 aux: torch.nn.Module | None = None, on_epoch_end=None, meta: dict | None = None,
                 log=print):
        cfg.validate()
        self.cfg, self.tokenizer, self.collate = cfg, tokenizer, collate
        self.train_data, self.val_data = train_data, val_data
        self.on_epoch_end, self.meta, self.log = on_epoch_end, meta or {}, log
        self.rank, self.world, self.device = init_distributed(resolve_device(cfg.device))
        self.is_main = self.rank == 0
        self.dtype = autocast_dtype(self.device, cfg.precision)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.aux = aux.to(self.device) if aux is not None else None
        self.net = TrainStep(self.model, self.aux, cfg.aux_weight)
        vision = list(self.model.vision.parameters())
        self.feature_cache = (FeatureCache(self.model.vision, cfg.feature_cache_gb * 2 ** 30)
                              if self.device.type == "cpu" and cfg.feature_cache_gb > 0 and vision
                              and not any(p.requires_grad for p in vision) else None)
        if self.world > 1:              # broadcasts rank 0's weights, then averages gradients
            for data in (train_data, val_data):
                if hasattr(data, "split_by_node"):          # streamed sources read disjoint rows per rank
                    data.split_by_node(self.rank, self.world)
            self.net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:                 # evaluation and generate() keep using the plain model
            self.net = torch.compile(self.net)
        modules = [self.model] + ([self.aux] if self.aux is not None else [])
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.opt = torch.optim.AdamW(param_groups(modules, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.global_batch = cfg.batch_size * self.world          # samples per micro-batch, all ranks
        self.steps_per_epoch = len(train_data) // (self.global_batch * cfg.accum)
        self.batches_per_epoch = self.steps_per_epoch * cfg.accum   # per rank; leftovers are dropped
        if self.steps_per_epoch < 1:
            procs = f" × {self.world} 个进程" if self.world > 1 else ""
            raise UserError(f"训练数据只有 {len(train_data)} 条，不足一个批次（batch-size {cfg.batch_size}"
                            f" × 累积 {cfg.accum}{procs}）。请减小 --batch-size 或增加数据。")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = max(1, int(cfg.warmup * self.total_steps))
        self.workers = default_workers() if cfg.workers < 0 else cfg.workers
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.seen_in_epoch = 0                                     # samples of this epoch consumed, all ranks
        self.best = float("inf")
        self.bad_steps = 0
        self.skipped = 0
        self.stop_signal = None
        self.log_path = Path(cfg.output).with_suffix(".log.jsonl")

    # ------------------------------------------------------------------ data
    def loader(self, data, epoch: int, start: int = 0, shuffle: bool = True):
        """This rank's batches. shuffle: the epoch's permutation from sample `start` on, cut
        into global batches of batch-size x processes; rank r takes the r-th slice of each, and
        only whole optimizer steps are kept, so every rank makes the same number of steps.
        Without shuffle (evaluation) rank r takes items r, r+W, ... and nothing is dropped."""
        B, W = self.cfg.batch_size, self.world
        if shuffle:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
            order = torch.randperm(len(data), generator=g)[start:self.batches_per_epoch * B * W].tolist()
            keys = rank_keys(order, B, W, self.rank, self.cfg.accum)
        else:
            keys = list(range(self.rank, len(data), W))
        if getattr(data, "epoch_keys", False):
            keys = [(epoch, i) for i in keys]
        loaders = self.__dict__.setdefault("_loaders", {})
        if (id(data), shuffle) not in loaders:
            loaders[id(data), shuffle] = DataLoader(
                data, batch_size=self.cfg.batch_size, sampler=EpochKeys(), collate_fn=self.collate,
                num_workers=self.workers, drop_last=shuffle, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0)
        loader = loaders[id(data), shuffle]
        loader.sampler.keys = keys
        return loader

    def to_device(self, batch):
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ------------------------------------------------------------------ steps
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def loss(self, batch):
        """(loss to optimise, the language-model loss that is shown and logged)."""
        with self.autocast():
            return self.net(batch)

    def all_reduce(self, values: list[float], op=None) -> list[float]:
        """Sum (or `op`) of a few numbers over all ranks; the numbers themselves on one process."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def optimizer_step(self) -> bool:
        """Clip, step, schedule. A non-finite gradient skips the step (counted); too many in a
        row stop the run, leaving the last good checkpoint as it was."""
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not torch.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            self.scaler.update()
            self.skipped += 1
            self.bad_steps += 1
            if self.is_main and self.dtype != torch.float16:     # fp16 loss scaling skips a few steps by design
                self.log(f"第 {self.step + 1} 步的损失或梯度是 NaN/Inf，已跳过这一步（本次训练共跳过 {self.skipped} 步）。")
            if self.bad_steps >= self.cfg.max_bad_steps and self.dtype != torch.float16:
                raise UserError(f"连续 {self.bad_steps} 步出现 NaN/Inf 损失或梯度，训练已停止；上一个好的检查点未被改动。"
                                f"请降低 --lr 或检查数据。")
            return False
        self.bad_steps = 0
        lr = lr_at(self.step, self.total_steps, self.cfg.lr, self.warmup_steps, self.cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return True

    @torch.no_grad()
    def evaluate_loss(self, data) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for batch in self.loader(data, 0, shuffle=False):
            batch = self.to_device(batch)
            with self.autocast():
                loss, _ = self.model(batch["input_ids"], batch["pixels"], batch["labels"])
            total += float(loss) * len(batch["input_ids"])
            n += len(batch["input_ids"])
        self.model.train()
        total, n = self.all_reduce([total, n])                    # every rank scored its own share
        return total / max(1, n)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"format": RESUME_FORMAT, "version": VERSION,
                "checkpoint": checkpoint_dict(self.model, self.tokenizer, self.meta),
                "aux": self.aux.state_dict() if self.aux is not None else None,
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "seen_in_epoch": self.seen_in_epoch, "world_size": self.world, "best": self.best, "skipped": self.skipped, "rng": rng_state(),
                "train_config": asdict(self.cfg)}

    def resume_bytes(self) -> int:
        """A lower bound on the size of one resume-state file: the stored weights plus AdamW's two
        moments per trained parameter (frozen backbone weights of a "delta" checkpoint are not stored)."""
        trained = [p for g in self.opt.param_groups for p in g["params"]]
        moments = 2 * sum(p.numel() * p.element_size() for p in trained)
        if self.meta.get("weights") == "delta":
            return moments + sum(p.numel() * p.element_size() for p in trained)
        modules = [self.model] + ([self.aux] if self.aux is not None else [])
        return moments + sum(v.numel() * v.element_size() for m in modules for v in m.state_dict().values())

    def save_resume(self):
        if self.is_main:
            atomic_save(self.state(), resume_path(self.cfg.output))

    def load_resume(self):
        path = resume_path(self.cfg.output)
        obj = read_file(path, "断点文件", RESUME_FORMAT) if path.exists() else None
        if obj is None:
            raise UserError(f"找不到断点文件 {path}，无法 --resume。去掉 --resume 从头训练，或检查 --output。")
        saved = obj["train_config"]
        if saved["batch_size"] != self.cfg.batch_size:
            raise UserError(f"断点用的是 --batch-size {saved['batch_size']}（每个进程），继续训练时必须相同。")
        restore_weights(self.model, obj["checkpoint"], path)
        if self.aux is not None and obj["aux"] is not None:
            self.aux.load_state_dict(obj["aux"])
        self.opt.load_state_dict(obj["optimizer"])
        self.scaler.load_state_dict(obj["scaler"])
        self.step, self.epoch = obj["step"], obj["epoch"]
        self.seen_in_epoch = obj.get("seen_in_epoch", obj["batch_in_epoch"] * saved["batch_size"])
        self.batch_in_epoch = self.seen_in_epoch // self.global_batch
        self.best, self.skipped = obj["best"], obj["skipped"]
        set_rng_state(obj["rng"])
        world = obj.get("world_size", 1)
        if (world, saved["accum"]) != (self.world, self.cfg.accum):
            # another global batch: continue at the same sample of the epoch; the schedule
            # counts this run's steps from the share of training already done
            self.step = self.epoch * self.steps_per_epoch + self.seen_in_epoch // (self.global_batch * self.cfg.accum)
            if self.is_main:
                self.log(f"断点来自 {world} 个进程 × 累积 {saved['accum']}，现在是 {self.world} 个进程 × 累积 "
                         f"{self.cfg.accum}：每步的全局批次由 {self.cfg.batch_size * world * saved['accum']} 变为 "
                         f"{self.global_batch * self.cfg.accum}，从本轮第 {self.seen_in_epoch} 个样本接着训练。")
        if self.is_main:
            self.log(f"从断点继续：第 {self.epoch + 1} 轮，第 {self.batch_in_epoch} 批（全局第 {self.step} 步）")

    def log_metrics(self, record: dict):
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    # ------------------------------------------------------------------ loop
    def fit(self):
        cfg = self.cfg
        if self.is_main:
            check_writable(cfg.output, self.resume_bytes())
        if cfg.resume:
            self.load_resume()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._fit()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.feature_cache is not None:
                self.feature_cache.remove()
        if self.world > 1:
            dist.barrier()                  # rank 0's last checkpoint is on disk before anyone leaves
        return self.best

    def should_stop(self) -> bool:
        """A signal seen by any rank stops all of them at the same step (none is left waiting)."""
        flag = float(self.stop_signal is not None)
        return (self.all_reduce([flag], dist.ReduceOp.MAX)[0] if self.world > 1 else flag) > 0

    def say(self, msg: str):
        if self.is_main:
            print(msg, flush=True)

    def _fit(self):
        cfg = self.cfg
        self.model.train()
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            bar = tqdm(total=self.batches_per_epoch, initial=self.batch_in_epoch, desc=f"Epoch {epoch + 1}/{cfg.epochs}",
                       bar_format=BAR, mininterval=0.5, dynamic_ncols=True, disable=not self.is_main)
            running, seen, t0, samples, shown = 0.0, 0, time.time(), 0, 0.0
            batches = self.loader(self.train_data, epoch, self.seen_in_epoch)
            last = len(batches) - 1
            for j, batch in enumerate(batches):
                batch = self.to_device(batch)
                sync = (j + 1) % cfg.accum == 0
                # accumulation micro-batches keep their gradients local; the last one all-reduces
                quiet = self.net.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
                with quiet:
                    loss, lm_loss = self.loss(batch)
                    self.scaler.scale(loss / cfg.accum).backward()
                running = running + lm_loss.detach()           # stays on the device: no per-step sync
                seen += 1
                samples += len(batch["input_ids"]) * self.world
                self.batch_in_epoch += 1
                self.seen_in_epoch += self.global_batch
                if sync:
                    self.optimizer_step()
                    if self.step % cfg.save_every == 0:
                        self.save_resume()
                    if self.should_stop():
                        bar.close()
                        self.save_resume()
                        raise TrainingInterrupted(resume_path(cfg.output))
                if self.is_main and (j == last or time.time() - shown > 0.5):  # read the loss only to show it
                    shown = time.time()
                    lr = self.opt.param_groups[0]["lr"]
                    bar.set_postfix_str(f"loss={float(lm_loss.detach()):.2f}, avg={float(running) / seen:.2f}, lr={lr:.1e}",
                                        refresh=False)
                bar.update(1)
            bar.close()
            total, count, samples = self.all_reduce([float(running), seen, samples])
            avg = total / max(1, count)
            self.say(f"Epoch {epoch + 1} 完成, 平均损失: {avg:.2f}")
            fc = self.feature_cache
            if fc is not None and epoch == 0:
                self.say(f"视觉编码器是冻结的：{len(fc.store)} 张图的特征已留在内存里（{fc.used / 2 ** 20:.0f} MiB），"
                         "之后各轮不再重算" + ("；内存上限已满，其余图片每轮照常计算（可调大 --feature-cache-gb）"
                                              if fc.full else "") + "。")
            record = {"epoch": epoch + 1, "step": self.step, "train_loss": round(avg, 5),
                      "lr": self.opt.param_groups[0]["lr"], "samples_per_s": round(samples / (time.time() - t0), 2),
                      "skipped_steps": self.skipped}
            if self.world > 1:
                record["processes"] = self.world
            score = avg
            if self.val_data is not None and len(self.val_data):
                score = record["val_loss"] = round(self.evaluate_loss(self.val_data), 5)
                self.say(f"验证损失: {score:.4f}")
            if self.on_epoch_end is not None and self.is_main:   # samples / metrics: rank 0 alone
                self.model.eval()
                extra = dict(self.on_epoch_end(self.model, epoch) or {})
                self.model.train()
                if "score" in extra:          # replaces the loss for choosing the best checkpoint (lower is better)
                    score = extra.pop("score")
                record.update(extra)
            if score < self.best:
                self.best = score
                if self.is_main:
                    print("→ 新的最佳损失! 保存模型...", flush=True)
                    save_checkpoint(cfg.output, self.model, self.tokenizer,
                                    {**self.meta, "epoch": epoch + 1, "step": self.step, "score": score})
            self.log_metrics(record)
            self.epoch, self.batch_in_epoch, self.seen_in_epoch = epoch + 1, 0, 0
            self.save_resume()
