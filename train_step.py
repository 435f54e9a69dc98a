"""The training step's device work, written so that nothing in it waits for the host.

    forward_backward(loss_fn, batch, scale) -> language-model loss, still on the device
    compile_step(...)                        -> the same function under torch.compile
    NonFinite                                -> non-finite steps skipped on the device

The batch carries its layout (layout.py: where images splice in, which positions are scored),
prepared by the collator on the CPU, so the step has no data-dependent shape: torch.compile
traces forward, loss and backward as one graph (tests/test_compile.py compiles it with
fullgraph=True, which fails on any graph break), with symbolic lengths: one graph serves every
batch (accumulating into existing gradients, with --grad-accum, is a second).
"""
from __future__ import annotations

import functools

import torch


def scored(model, batch):
    """(loss, logits) of a collated training batch, through the layout the collator prepared."""
    return model(batch["input_ids"], batch["pixels"], image_pos=batch["image_pos"], targets=batch["targets"],
                 attention=batch["attention"])


class TrainStep(torch.nn.Module):
    """The model and its optional auxiliary head as one module, so a single DDP wrapper averages
    the gradients of both. Returns (loss to optimise, language-model loss to show)."""

    def __init__(self, model, aux, aux_weight: float):
        super().__init__()
        self.model, self.aux, self.aux_weight = model, aux, aux_weight

    def forward(self, batch):
        lm_loss, _ = scored(self.model, batch)
        loss = lm_loss if self.aux is None else lm_loss + self.aux_weight * self.aux(batch)
        return loss, lm_loss


def forward_backward(loss_fn, batch, scale):
    """Forward, loss and backward of one micro-batch: loss_fn(batch) -> (loss, shown loss); the
    loss times `scale` (1 / accumulation steps, and fp16's loss scale) is what is differentiated."""
    loss, lm_loss = loss_fn(batch)
    (loss * scale).backward()
    return lm_loss.detach()


def compile_step(whole: bool = True, **compile_kw):
    """forward_backward under torch.compile (compile_kw: backend, ...), with dynamic shapes from
    the start: lengths change every batch, so a first graph for fixed shapes would be wasted.
    whole: backward traced into the forward's graph (dynamo's trace_autograd_ops), with
    fullgraph=True, which fails loudly on a graph break: dynamo's traced backward silently loses
    gradients across one. Otherwise (DDP, whose all-reduce hooks need autograd's own backward;
    the CPU feature cache, host work by design) the forward is compiled and AOTAutograd compiles
    its backward."""
    compiled = torch.compile(forward_backward, fullgraph=whole, dynamic=True, **compile_kw)

    @functools.wraps(forward_backward)
    def step(loss_fn, batch, scale):
        if batch["pixels"] is not None:           # the image size is the model's: patch grids stay plain ints
            for dim in (1, 2, 3):
                torch._dynamo.mark_static(batch["pixels"], dim)
        with torch._dynamo.config.patch(trace_autograd_ops=whole):
            return compiled(loss_fn, batch, scale)
    return step


class NonFinite:
    """Non-finite steps skipped on the device, as GradScaler does: whether the gradient norm is
    finite becomes the fused optimizer's found_inf, which turns its update (and step count) into
    a no-op. The counts stay on the device until read() (every --log-every steps), so no step
    waits for the host to look at a number."""

    def __init__(self, device):
        self.count, self.run, self.longest = (torch.zeros((), device=device) for _ in range(3))

    def step(self, opt, norm, scaler):
        """opt.step() (through the fp16 scaler if it is on), skipped if `norm` is not finite."""
        if hasattr(norm, "full_tensor"):                      # FSDP: a DTensor; every rank takes the same verdict
            norm = norm.full_tensor()
        bad = (~torch.isfinite(norm)).float()
        self.count += bad
        self.run.add_(bad).mul_(bad)                           # consecutive non-finite steps
        torch.maximum(self.longest, self.run, out=self.longest)
        if scaler.is_enabled():                                # fp16: the scaler skips on its own found_inf
            scaler.step(opt)
        elif getattr(opt, "_step_supports_amp_scaling", False):    # fused optimizers
            opt.found_inf = bad
            opt.step()
            del opt.found_inf
        elif not bad.item():                                   # others can't skip on the device
            opt.step()

    def read(self) -> tuple[int, int]:
        """(steps skipped since the last read, longest run of them in a row, including the run
        still going on at the last read). A host sync: call it every few steps."""
        count, longest = (int(v) for v in torch.stack([self.count, self.longest]).tolist())
        self.count.zero_()
        self.longest.copy_(self.run)
        return count, longest
