"""The one training loop both training scripts call.

AdamW, or Muon for the hidden matrices (optim.py) -> linear warmup + cosine decay -> bf16
autocast (fp16 + GradScaler where bf16 is missing) -> gradient accumulation and clipping ->
non-finite steps skipped -> validation each epoch -> best checkpoint by validation loss (or the last,
--keep last) -> resume state beside it.

Data order is a pure function of (seed, epoch), so a resumed run replays exactly the batches an
uninterrupted run would have seen and ends with the same weights.

Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel: NCCL on GPUs, gloo on CPUs;
each rank takes its own slice of every global batch of the epoch's order (batch-size x processes
samples), so all ranks make the same number of steps; accumulation micro-batches skip the
all-reduce (no_sync); only rank 0 prints, logs and writes files. Resume state records the samples
consumed in the epoch, so a run may continue on a different number of processes. Datasets whose
items change per epoch (a fresh question, another caption) set `epoch_keys = True` and receive
(epoch, index) keys instead of plain indices, which also works with persistent workers.

Read Trainer.fit first: fit -> train_epoch -> train_batch -> optimizer_step, then end_epoch;
the methods below them are the parts they call. Options: train_config.py; files: checkpoint.py.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from batch_probe import resolve_batch
from checkpoint import (ResumeWriter, check_writable, claim_output, load_resume, resume_bytes, resume_path,
                        resume_state, save_checkpoint)
from devices import autocast_dtype, default_workers, resolve_device, store_frozen_in
from distributed import all_reduce, init_distributed, rank_keys, say
from errors import UserError
from feature_cache import CachedTower
from optim import build_optimizer, lr_at
from pace import Pace, epoch_bar
from train_config import TrainConfig
from train_step import NonFinite, TrainStep, compile_step, forward_backward, scored


@dataclass
class EpochReport:
    """What an epoch callback (Trainer's on_epoch_end) returns: numbers for the epoch's log line
    and, optionally, the score that picks the best checkpoint instead of the loss (lower is better)."""
    metrics: dict = field(default_factory=dict)
    score: float | None = None


class TrainingInterrupted(Exception):
    """Raised after resume state was saved on SIGINT/SIGTERM."""


# ----------------------------------------------------------------------------- the loop's parts

class EpochKeys(torch.utils.data.Sampler):
    """The keys of the current pass, replaced before each pass, so one DataLoader and its
    persistent workers serve every epoch (no worker start-up per epoch)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


@contextlib.contextmanager
def signals_caught(handler):
    """SIGINT and SIGTERM call `handler` inside the block; the previous handlers come back after."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    def __init__(self, model, tokenizer, train_data, collate, cfg: TrainConfig, val_data=None,
                 aux: torch.nn.Module | None = None, on_epoch_end=None, meta: dict | None = None,
                 log=print):
        """on_epoch_end(model, epoch) -> EpochReport | None runs on rank 0 after each epoch."""
        cfg.validate()
        self.cfg, self.tokenizer, self.collate = cfg, tokenizer, collate
        self.train_data, self.val_data = train_data, val_data
        self.on_epoch_end, self.meta, self.log = on_epoch_end, meta or {}, log
        self.rank, self.world, self.device = init_distributed(resolve_device(cfg.device))
        self.is_main = self.rank == 0
        self.dtype = autocast_dtype(self.device, cfg.precision)
        torch.manual_seed(cfg.seed)
        self.model = model                      # on the device once wrapped (parallel)
        if self.dtype == torch.bfloat16 and self.meta.get("weights") == "delta":   # frozen base: never stored
            store_frozen_in(self.model, self.dtype)
        self.aux = aux.to(self.device) if aux is not None else None
        self.feature_cache = self.cache_for(self.model.vision)
        self.net = self.training_step()
        self.opt = build_optimizer(cfg.optimizer, self.model, self.aux, cfg.lr, cfg.weight_decay, self.device, self.dtype,
                                   cfg.muon_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        cfg.batch_size = resolve_batch(self)                       # --batch-size auto: probed here
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
        self.loaders: dict[tuple[int, bool], DataLoader] = {}      # (id(data), shuffle) -> its one loader
        self.step, self.epoch, self.batch_in_epoch, self.seen_in_epoch = 0, 0, 0, 0   # seen: samples, all ranks
        self.best, self.stop_signal = float("inf"), None
        self.skipped, self.nonfinite = 0, NonFinite(self.device)     # non-finite steps: counted, skipped on the device
        self.log_path = Path(cfg.output).with_suffix(".log.jsonl")
        self.saver, self.saved_at, self.resuming = ResumeWriter(cfg.output), time.monotonic(), cfg.resume

    def cache_for(self, tower) -> CachedTower | None:
        """A feature cache for a frozen tower on a CPU (--feature-cache-gb > 0), else None."""
        params = list(tower.parameters())
        if self.device.type != "cpu" or self.cfg.feature_cache_gb <= 0 or not params:
            return None
        return None if any(p.requires_grad for p in params) else CachedTower(tower, self.cfg.feature_cache_gb * 2 ** 30)

    def training_step(self) -> torch.nn.Module:
        """The model and aux head as one module on the device (parallel). With --compile, forward and
        backward are compiled as one step (train_step.compile_step); evaluation and generate() keep
        using the plain model."""
        net = TrainStep(self.model, self.aux, self.cfg.aux_weight)
        net = self.parallel(net)
        whole = self.world == 1 and self.feature_cache is None
        self.forward_backward = compile_step(whole) if self.cfg.compile else forward_backward
        return net

    def parallel(self, net: torch.nn.Module) -> torch.nn.Module:
        """Onto the device; under torchrun in DDP: rank 0's weights, averaged gradients (--fsdp: sharding.py)."""
        net = net.to(self.device)
        return net if self.world == 1 else DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the loop, top to bottom
    def fit(self):
        """Train from epoch `self.epoch` (0, or where --resume left off) to the last; returns the
        best score. Ctrl-C / SIGTERM save resume state and raise TrainingInterrupted."""
        self.resuming = self.cfg.resume and resume_path(self.cfg.output).exists()
        if self.cfg.resume and not self.resuming:          # a job script may always pass --resume
            say(f"没有找到断点文件 {resume_path(self.cfg.output)}，从头开始训练。")
        if self.is_main:
            self.prepare_output()
        if self.resuming:
            self.load_resume()
        val_per_step = (self.cfg.epochs - self.epoch) * len(self.val_data or ()) / (self.global_batch * self.cfg.accum)
        self.pace = Pace(self.total_steps, val_per_step, self.is_main).begin(self.step, self.device, self.dtype)
        try:
            with signals_caught(self._on_signal):
                self.model.train()
                for epoch in range(self.epoch, self.cfg.epochs):
                    self.epoch = epoch
                    train_loss, samples_per_s = self.train_epoch(epoch)
                    self.end_epoch(epoch, train_loss, samples_per_s)
            self.pace.finish()
        finally:
            if self.feature_cache is not None:
                self.feature_cache.store.clear()
            self.saver.wait()               # the last resume save is on disk (or its error raised)
        if self.world > 1:
            dist.barrier()                  # rank 0's last checkpoint is on disk before anyone leaves
        return self.best

    def prepare_output(self):
        """Before the first step: a fresh run may not replace another run's model (--overwrite)
        and starts a fresh log; the output must have room for a resume save."""
        fresh = not self.resuming and self.step == 0        # not continuing a loaded resume state
        if fresh:
            claim_output(self.cfg.output, self.meta, self.cfg.overwrite)
        check_writable(self.cfg.output, self.resume_bytes())
        if fresh:
            self.log_path.unlink(missing_ok=True)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the epoch's batches, from where a resumed run stopped.
        Returns (mean language-model loss, samples per second), over all ranks."""
        bar = epoch_bar(self.batches_per_epoch, self.batch_in_epoch, f"Epoch {epoch + 1}/{self.cfg.epochs}", self.is_main)
        running, seen, t0, samples = 0.0, 0, time.time(), 0
        batches = self.loader(self.train_data, epoch, self.seen_in_epoch)
        shown_every = self.cfg.accum * self.cfg.log_every          # reading the loss waits for the device
        with bar:
            for j, batch in enumerate(batches):
                batch = self.to_device(batch)
                lm_loss = self.train_batch(batch, sync=(j + 1) % self.cfg.accum == 0)
                running = running + lm_loss                    # stays on the device: no per-step sync
                seen += 1
                samples += batch["samples"] * self.world
                if self.is_main and (j == len(batches) - 1 or (j + 1) % shown_every == 0):
                    lr = self.opt.param_groups[0]["lr"]
                    bar.set_postfix_str(f"loss={float(lm_loss):.2f}, avg={float(running) / seen:.2f}, lr={lr:.1e}",
                                        refresh=False)
                bar.update(1)
        self.check_nonfinite()
        total, count, samples = self.all_reduce([float(running), seen, samples])
        return total / max(1, count), samples / (time.time() - t0)

    def train_batch(self, batch, sync: bool):
        """Forward and backward of one micro-batch; on the last of an optimizer step (`sync`) the
        step itself, a background resume save every --save-minutes (or --save-every steps), and a
        stop (after a save that completes first) if a signal came."""
        # accumulation micro-batches keep their gradients local; the last one all-reduces
        quiet = self.net.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
        scale = 1 / self.cfg.accum
        if self.scaler.is_enabled():                            # fp16's loss scale
            scale = self.scaler.scale(torch.full((), scale, device=self.device))
        with quiet:
            lm_loss = self.forward_backward(self.loss, batch, scale)
        self.batch_in_epoch += 1
        self.seen_in_epoch += self.global_batch
        if sync:
            self.optimizer_step()
            self.pace.step_done(self.step)
            if self.step % self.cfg.log_every == 0:
                self.check_nonfinite()
            if self.save_due():
                self.save_resume(background=True)
            if self.should_stop():
                self.save_resume(background=False)
                raise TrainingInterrupted(resume_path(self.cfg.output))
        return lm_loss

    def save_due(self) -> bool:
        """After an optimizer step: every --save-every steps, or --save-minutes after the last save."""
        every = self.cfg.save_every
        return bool(every and self.step % every == 0) or time.monotonic() - self.saved_at >= 60 * self.cfg.save_minutes

    def optimizer_step(self):
        """Clip, schedule, step. A non-finite gradient makes the step a no-op on the device
        (train_step.NonFinite); check_nonfinite counts and reports such steps every few steps."""
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        lr = lr_at(self.step, self.total_steps, self.cfg.lr, self.warmup_steps, self.cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.nonfinite.step(self.opt, norm, self.scaler)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def check_nonfinite(self):
        """Every --log-every steps and at each epoch's end: steps skipped for a NaN/Inf loss or
        gradient are counted and reported; too many in a row stop the run, leaving the last good
        checkpoint as it was."""
        new, longest = self.nonfinite.read()
        self.skipped += new
        if self.dtype == torch.float16:                  # fp16 loss scaling skips a few steps by design
            return
        if new and self.is_main:
            self.log(f"截至第 {self.step} 步，最近有 {new} 步的损失或梯度是 NaN/Inf，已跳过（本次训练共跳过 {self.skipped} 步）。")
        if longest >= self.cfg.max_bad_steps:
            raise UserError(f"连续 {longest} 步出现 NaN/Inf 损失或梯度，训练已停止；上一个好的检查点未被改动。"
                            f"请降低 --lr 或检查数据。")

    def end_epoch(self, epoch: int, train_loss: float, samples_per_s: float):
        """Report the epoch, validate, run the callback, keep the best checkpoint, log, save resume state."""
        say(f"Epoch {epoch + 1} 完成, 平均损失: {train_loss:.2f}")
        if epoch == 0 and self.feature_cache is not None:
            say(self.feature_cache.report())
        record = {"epoch": epoch + 1, "step": self.step, "train_loss": round(train_loss, 5),
                  "lr": self.opt.param_groups[0]["lr"], "samples_per_s": round(samples_per_s, 2),
                  "skipped_steps": self.skipped, **self.pace.record()}
        if self.world > 1:
            record["processes"] = self.world
        score = train_loss
        if self.val_data is not None and len(self.val_data):
            score = record["val_loss"] = round(self.evaluate_loss(self.val_data), 5)
            say(f"验证损失: {score:.4f}")
        report = self.epoch_report(epoch)
        record.update(report.metrics)
        if report.score is not None:
            score = report.score
        improved = score < self.best                  # False for a NaN score, which never becomes the best
        if improved:
            self.best = score
        if (improved or self.cfg.keep == "last") and self.is_main:
            print("→ 新的最佳损失! 保存模型..." if improved else "→ 不比之前最好的低，按 --keep last 仍保存这一轮...", flush=True)
            save_checkpoint(self.cfg.output, self.model, self.tokenizer,
                            {**self.meta, "epoch": epoch + 1, "step": self.step, "score": score})
        self.log_metrics(record)
        self.epoch, self.batch_in_epoch, self.seen_in_epoch = epoch + 1, 0, 0
        self.save_resume(background=True)

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
        if (id(data), shuffle) not in self.loaders:
            self.loaders[id(data), shuffle] = DataLoader(
                data, batch_size=B, sampler=EpochKeys(), collate_fn=self.collate,
                num_workers=self.workers, drop_last=shuffle, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0)
        loader = self.loaders[id(data), shuffle]
        loader.sampler.keys = keys
        return loader

    def to_device(self, batch):
        """Tensors and the collator's layout (layout.Targets) to the device, the rest as it is."""
        return {k: v.to(self.device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}

    # ------------------------------------------------------------------ forward passes
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @contextlib.contextmanager
    def cached_features(self):
        """Inside the block the model sees its frozen tower through the feature cache (if there
        is one); outside it holds the bare tower, so saved checkpoints keep their keys."""
        if self.feature_cache is None:
            yield
            return
        self.model.vision = self.feature_cache
        try:
            yield
        finally:
            self.model.vision = self.feature_cache.tower

    def loss(self, batch):
        """(loss to optimise, the language-model loss that is shown and logged)."""
        with self.autocast(), self.cached_features():
            return self.net(batch)

    @torch.no_grad()
    def evaluate_loss(self, data) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for batch in self.loader(data, 0, shuffle=False):
            batch = self.to_device(batch)
            with self.autocast(), self.cached_features():
                loss, _ = scored(self.model, batch)
            total += loss.float() * batch["samples"]                 # summed on the device
            n += batch["samples"]
        self.model.train()
        total, n = self.all_reduce([float(total), n])                    # every rank scored its own share
        return total / max(1, n)

    def epoch_report(self, epoch: int) -> EpochReport:
        """The epoch callback's report (samples, metrics): rank 0 alone runs it."""
        if self.on_epoch_end is None or not self.is_main:
            return EpochReport()
        self.model.eval()
        with self.autocast(), self.cached_features():
            report = self.on_epoch_end(self.model, epoch) or EpochReport()
        self.model.train()
        return report

    # ------------------------------------------------------------------ resume state
    def state(self) -> dict:
        progress = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "seen_in_epoch": self.seen_in_epoch, "world_size": self.world, "best": self.best,
                    "skipped": self.skipped}
        return resume_state(self.model, self.tokenizer, self.meta, self.aux, self.opt, self.scaler, progress,
                            asdict(self.cfg))

    def resume_bytes(self) -> int:
        return resume_bytes(self.model, self.aux, self.opt, self.meta.get("weights") == "delta")

    def save_resume(self, background: bool):
        if self.is_main:
            self.saver.save(self.state(), background)
        self.saved_at = time.monotonic()

    def load_resume(self):
        obj = load_resume(self.cfg.output, asdict(self.cfg), self.model, self.aux, self.opt, self.scaler)
        self.step, self.epoch, self.best, self.skipped = obj["step"], obj["epoch"], obj["best"], obj["skipped"]
        self.seen_in_epoch = obj["seen_in_epoch"]
        self.batch_in_epoch = self.seen_in_epoch // self.global_batch
        world, accum = obj["world_size"], obj["train_config"]["accum"]
        if (world, accum) != (self.world, self.cfg.accum):
            # another global batch: continue at the same sample of the epoch; the schedule
            # counts this run's steps from the share of training already done
            self.step = self.epoch * self.steps_per_epoch + self.seen_in_epoch // (self.global_batch * self.cfg.accum)
            if self.is_main:
                self.log(f"断点来自 {world} 个进程 × 累积 {accum}，现在是 {self.world} 个进程 × 累积 "
                         f"{self.cfg.accum}：每步的全局批次由 {self.cfg.batch_size * world * accum} 变为 "
                         f"{self.global_batch * self.cfg.accum}，从本轮第 {self.seen_in_epoch} 个样本接着训练。")
        if self.is_main:
            self.log(f"从断点继续：第 {self.epoch + 1} 轮，第 {self.batch_in_epoch} 批（全局第 {self.step} 步）")

    # ------------------------------------------------------------------ processes, signals, output
    def all_reduce(self, values: list[float], op=None) -> list[float]:
        return all_reduce(values, self.world, self.device, op)

    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def should_stop(self) -> bool:
        """A signal seen by any rank stops all of them at the same step (none is left waiting):
        under torchrun the ranks compare their flags every --log-every steps (an all-reduce waits)."""
        if self.world == 1 or self.step % self.cfg.log_every:
            return self.world == 1 and self.stop_signal is not None
        return self.all_reduce([float(self.stop_signal is not None)], dist.ReduceOp.MAX)[0] > 0

    def log_metrics(self, record: dict):
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
