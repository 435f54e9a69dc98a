"""The optimizer and its schedule.

--optimizer adamw: AdamW for every trained parameter (no decay on norms and biases).
--optimizer muon: Muon (Keller Jordan, 2024) for the hidden weight matrices -- every trained
nn.Linear weight of the model except the LM's output layer (the vocabulary's rows) -- and AdamW for the
rest (embeddings, positions, the patch convolution, norms, biases, the auxiliary head). Muon
keeps a momentum per matrix and steps along its orthogonalised version (Newton-Schulz), so each
update moves every direction of the matrix by about the same amount; a model trained from scratch
reaches in 4 epochs the validation loss AdamW reaches in 7 (docs/training.md).
Either way the learning rate follows lr_at (warmup, then cosine), scaled per parameter by its
`lr_scale` (backbones.configure_training).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)        # the quintic Newton-Schulz step of torch.optim.Muon


def lr_at(step: int, total: int, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from peak/warmup to peak, then cosine from peak to peak*min_ratio at `total`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(modules, weight_decay: float, exclude=()):
    """AdamW's groups: no weight decay on 1-D parameters (norms, biases, CLS). A parameter's
    `lr_scale` attribute (set by backbones.configure_training, default 1) multiplies its
    learning rate. Parameters in `exclude` (Muon's) are left out."""
    groups, skip = {}, {id(p) for p in exclude}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in skip:
                groups.setdefault((p.ndim < 2, getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": groups.get((nd, s), []), "weight_decay": 0.0 if nd else weight_decay, "lr_scale": s}
            for s in sorted({s for _, s in groups} | {1.0}, reverse=True) for nd in (False, True)]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Muon's parameters: the trained weights of the model's nn.Linear layers, except the LM's
    output layer (its rows are tokens, like an embedding's, and AdamW suits them)."""
    head = model.lm.get_output_embeddings()
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m is not head]


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype=torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz on a stack of wide matrices (k, m, n), m <= n: about U V^T for each
    G = U S V^T, with singular values pushed into roughly [0.5, 1.5] (torch.optim.Muon's iteration,
    which runs in bf16)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum 0.95, 5 Newton-Schulz steps, learning rate
    scaled by 0.2 * sqrt(max(rows, cols)) to match AdamW's update size, no weight decay), with
    two differences: matrices of one shape (a tall one counts as its transpose) are orthogonalised
    together in one batched iteration, and a non-finite step is skipped on the device like the
    fused AdamW's (found_inf; a grad_scale the fp16 GradScaler hands over divides the gradients),
    so the loop never waits for the host to look at the gradient.
    The iteration runs in `ns_dtype`: bf16 where training computes in bf16, else fp32 (a CPU
    without AMX multiplies bf16 matrices slowly; fp16's range is too narrow for it)."""
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5, ns_dtype=torch.bfloat16):
        super().__init__(params, {"lr": lr, "momentum": momentum, "ns_steps": ns_steps})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        found_inf, scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(sorted(p.shape))].append(p)
            for params in by_shape.values():
                self._step_same_shape(params, group, found_inf, scale)

    def _step_same_shape(self, params, group, found_inf, scale):
        def wide(t):
            return t.mT if t.shape[0] > t.shape[1] else t

        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = torch.stack([wide(p.grad) for p in params]).float()
        if scale is not None:
            grads = grads / scale
        bufs = torch.stack([wide(self.state[p]["momentum_buffer"]) for p in params])
        if found_inf is not None:                                  # a skipped step changes nothing
            ok = found_inf == 0
            grads = torch.where(ok, grads, 0.0)
        mom = group["momentum"]
        new_bufs = bufs.lerp(grads, 1 - mom)
        update = orthogonalize(grads.lerp(new_bufs, mom), group["ns_steps"], self.ns_dtype)
        if found_inf is not None:
            new_bufs = torch.where(ok, new_bufs, bufs)
            update = update * ok
        lr = group["lr"] * 0.2 * math.sqrt(max(params[0].shape))
        for p, buf, u in zip(params, new_bufs, update):
            wide(self.state[p]["momentum_buffer"]).copy_(buf)
            wide(p).add_(u.to(p.dtype), alpha=-lr)


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, saved and restored as one: the trainer,
    the fp16 GradScaler and checkpoint.py see one optimizer with every group."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        self._step_supports_amp_scaling = all(getattr(o, "_step_supports_amp_scaling", False) for o in parts)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def step(self):
        for o in self.parts:
            for name in ("grad_scale", "found_inf"):             # handed on from NonFinite / GradScaler
                if hasattr(self, name):
                    setattr(o, name, getattr(self, name))
            o.step()
            for name in ("grad_scale", "found_inf"):
                if hasattr(o, name):
                    delattr(o, name)

    def zero_grad(self, set_to_none: bool = True):
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict):
        for o, s in zip(self.parts, state["parts"], strict=True):
            o.load_state_dict(s)


def build_optimizer(name: str, model: nn.Module, aux: nn.Module | None, lr: float, weight_decay: float,
                    device: torch.device, dtype=torch.float32, ns_steps: int = 5):
    """--optimizer's choice over the model's (and the auxiliary head's) trained parameters;
    `dtype`: what training computes in (autocast's), which picks Muon's; ns_steps: Muon's
    Newton-Schulz iterations (--muon-steps)."""
    modules = [model] + ([aux] if aux is not None else [])
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    hidden = hidden_matrices(model) if name == "muon" else []
    adamw = torch.optim.AdamW(param_groups(modules, weight_decay, hidden), lr=lr, betas=(0.9, 0.95), **fused)
    if name == "adamw":
        return adamw
    if not hidden:
        raise UserError("--optimizer muon 需要要训练的权重矩阵（nn.Linear），这次训练一个也没有；请用 --optimizer adamw。")
    groups = defaultdict(list)
    for p in hidden:
        groups[getattr(p, "lr_scale", 1.0)].append(p)
    ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return Optimizers(adamw, Muon([{"params": ps, "lr_scale": s} for s, ps in groups.items()], lr=lr,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
