"""FSDP2 (`--fsdp`, under torchrun): each rank keeps only its share of the weights, gradients and
optimizer state, so an LLM that does not train on one GPU (a 7B with --train all) trains on several.

What is sharded: each decoder block of the language model, each block of the vision tower when it
trains, then the rest of the model (embeddings, projector, norms, head) as its root; the aux head,
if any, as a root of its own. With bf16 the blocks compute in bf16 while gradients are reduced in
fp32 and the optimizer keeps fp32 masters (MixedPrecisionPolicy).

FSDPTrainer is Trainer with these differences:
- start: the model stays on the CPU until it is sharded; each block goes to the device as its own
  shard, then rank 0's weights are broadcast into the shards (DDP also starts from rank 0's), so
  no GPU holds the whole model;
- accumulation micro-batches keep their gradients local (no_sync, as under DDP);
- saving gathers the full state to rank 0's CPU (torch.distributed.checkpoint's state-dict
  helpers; every rank takes part, so the ranks decide together when to save); inside that block
  rank 0's model and optimizer state_dict() return it in the usual form, so checkpoint.py writes
  the same files as without FSDP: they load and resume with or without --fsdp, on any number of
  processes;
- resume: every rank memory-maps the resume file (its pages are shared, not copied per rank) and
  keeps only its own shard of each tensor;
- validation and the epoch callback (rank 0 generates samples) run with the weights gathered once
  (each rank holds a full copy in the compute dtype meanwhile) and sharded again after.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.utils.serialization
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from distributed import dist_env, say
from errors import UserError
from trainer import Trainer

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)      # the full state, on rank 0's CPU only
SCATTER = StateDictOptions(full_state_dict=True)                       # every rank holds it and keeps its shard


def trainer_class(cfg) -> type[Trainer]:
    """FSDPTrainer for --fsdp under torchrun; a single process has nothing to shard."""
    if cfg.fsdp and dist_env()[1] == 1:
        say("提示：--fsdp 只在用 torchrun 启动多个进程时起作用；这次是单进程，按普通方式训练。")
    return FSDPTrainer if cfg.fsdp and dist_env()[1] > 1 else Trainer


def blocks(part: nn.Module) -> list[nn.Module]:
    """A part's repeated blocks: the ModuleList holding most of its parameters (the decoder layers
    of an LLM, the encoder layers of a vision tower; built-in or Hugging Face, with LoRA or not)."""
    lists = [m for m in part.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[]))


def shard(root: nn.Module, inner: list[nn.Module], mesh, dtype) -> nn.Module:
    """fully_shard each of `inner`, then `root` (the rest of it), in place; rank 0's weights are
    broadcast into every rank's shards. Parameters keep their `lr_scale` (backbones.configure_training)."""
    rank0 = root.state_dict() if dist.get_rank() == 0 else {}
    scales = {n: p.lr_scale for n, p in root.named_parameters() if hasattr(p, "lr_scale")}
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for module in inner:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    set_model_state_dict(root, rank0, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, p in root.named_parameters():
        if name in scales:
            p.lr_scale = scales[name]
    return root


class ShardedStep(nn.Module):
    """The training step whose parts are sharded; no_sync() as DDP's (gradients stay local)."""

    def __init__(self, step: nn.Module, roots: list[FSDPModule]):
        super().__init__()
        self.step, self.roots = step, roots

    def forward(self, batch):
        return self.step(batch)

    @contextlib.contextmanager
    def no_sync(self):
        for root in self.roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in self.roots:
                root.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(roots: list[FSDPModule]):
    """Every rank enters: inside, each sharded module holds its full weights and keeps them through
    forward passes, which then need no collective, so rank 0 may run some alone (generation).
    After: sharded again, and FSDP forgets the forwards it saw in here (it would replay their
    order as all-gathers in the next backward, on rank 0 only); that needs each root to have run
    a forward by then (FSDP sets itself up in the first)."""
    for m in [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]:
        m.unshard()
    for root in roots:
        root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for root in roots:
            root.set_reshard_after_forward(True)
            root.set_reshard_after_forward(False, recurse=False)     # a root keeps its weights for the backward
            root.reset_iter_state()                                  # reshards all, clears the forward order


@contextlib.contextmanager
def standing_in(replacements: list, mmap: bool | None = None):
    """For each (obj, name, fn): inside the block obj.name(...) calls fn(...) instead; while fn runs
    obj.name is the real method again (torch's state-dict helpers call it). mmap: torch.load maps
    files instead of reading them, meanwhile."""
    def stand_in(obj, name, fn):
        def call(*args, **kwargs):
            delattr(obj, name)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(obj, name, call)
        return call
    config, before = torch.utils.serialization.config.load, torch.utils.serialization.config.load.mmap
    config.mmap = before if mmap is None else mmap
    for obj, name, fn in replacements:
        setattr(obj, name, stand_in(obj, name, fn))
    try:
        yield
    finally:
        config.mmap = before
        for obj, name, _ in replacements:
            delattr(obj, name)


def indexed(state: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's form) in
    torch's own form, keyed by the parameter's position in the optimizer (what checkpoint.py stores)."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def named(state: dict, names: list[str]) -> dict:
    """indexed() undone."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


class FSDPTrainer(Trainer):
    """Trainer with the model sharded by FSDP2 (see the module's docstring)."""

    def parallel(self, net: nn.Module) -> nn.Module:
        if self.dtype == torch.float16:
            raise UserError("--fsdp 需要 bf16 或 fp32 精度（这块 GPU 不支持 bf16，只能用 fp16）。请去掉 --fsdp，"
                            "或用 --precision fp32。")
        mesh = init_device_mesh(self.device.type, (self.world,))
        vision_trains = any(p.requires_grad for p in self.model.vision.parameters())
        inner = blocks(self.model.lm) + (blocks(self.model.vision) if vision_trains else [])
        self.roots = [shard(self.model, inner, mesh, self.dtype)]
        if self.aux is not None:
            self.roots.append(shard(self.aux, [], mesh, self.dtype))
        self.parts, self.full = net, None                 # the unwrapped step: its names key the optimizer state
        return ShardedStep(net, self.roots)

    def param_names(self) -> list[str]:
        """The optimizer's parameters by name, in its order (the numbering of its state_dict())."""
        names = {p: n for n, p in self.parts.named_parameters()}
        return [names[p] for g in self.opt.param_groups for p in g["params"]]

    def save_due(self) -> bool:
        """A save gathers the shards, so every rank takes part: all save when any rank's clock says so."""
        return self.all_reduce([float(super().save_due())], dist.ReduceOp.MAX)[0] > 0

    @contextlib.contextmanager
    def full_state(self):
        """Every rank enters (it gathers): inside, rank 0's model, aux head and optimizer give their full
        state from state_dict(), in the form they have without FSDP, for checkpoint.py to write."""
        if self.full is not None:                         # already gathered (a save inside end_epoch)
            yield
            return
        parts = [(m, get_model_state_dict(m, options=GATHER)) for m in self.roots]
        optim = get_optimizer_state_dict(self.parts, self.opt, options=GATHER)
        self.full = parts + [(self.opt, indexed(optim, self.param_names()) if self.is_main else {})]

        def giving(obj, state):
            return lambda *a, keep_vars=False, **kw: obj.state_dict(*a, keep_vars=True, **kw) if keep_vars else state
        try:
            with standing_in([(obj, "state_dict", giving(obj, state)) for obj, state in self.full if self.is_main]):
                yield
        finally:
            self.full = None

    def loading(self):
        """Inside, the model's, aux head's and optimizer's load_state_dict() take a full state, which
        every rank has read (memory-mapped), and keep their own shard of it."""
        def model_loader(m):
            return lambda state, strict=True: set_model_state_dict(m, state, options=StateDictOptions(
                full_state_dict=True, strict=strict))

        def optimizer_loader(state):
            return set_optimizer_state_dict(self.parts, self.opt, named(state, self.param_names()), options=SCATTER)
        loaders = [(m, "load_state_dict", model_loader(m)) for m in self.roots]
        return standing_in(loaders + [(self.opt, "load_state_dict", optimizer_loader)], mmap=True)

    def save_resume(self, background: bool):
        with self.full_state():
            super().save_resume(background)

    def end_epoch(self, epoch: int, train_loss: float, samples_per_s: float):
        with self.full_state():                  # the weights don't change in here: one gather for both saves
            super().end_epoch(epoch, train_loss, samples_per_s)

    def load_resume(self):
        with self.loading():
            super().load_resume()

    def evaluate_loss(self, data) -> float:
        with gathered([self.model]):             # the aux head takes no part (nor its first forward yet)
            return super().evaluate_loss(data)

    def epoch_report(self, epoch: int):
        if self.on_epoch_end is None:
            return super().epoch_report(epoch)
        with gathered([self.model]):
            return super().epoch_report(epoch)
