"""Leaner autograd for frozen Hugging Face decoder blocks: same forward values, fewer saved tensors.

With the weights frozen, gradients still flow through the language model (to the projector, say),
and autograd keeps for the backward whatever the ops' input gradients need. Two of HF's modules
keep more than that needs (bench/bench_memory.py, docs/benchmarks.md "训练内存"):
  gated MLP  down(silu(gate(x)) * up(x)) keeps gate(x) (silu's input), silu(gate(x)) and up(x);
             silu_mul keeps gate(x) and up(x) and recomputes the silu in the backward (-1/3).
  RMSNorm    upcasts its bf16 input to fp32, and that fp32 copy is kept (4 bytes an element);
             rms_norm keeps the input as it came (bf16: 2 bytes) and one fp32 rstd per row.
The forwards run HF's ops in HF's order, so their outputs are bit-identical. Only frozen modules
are made lean (frozen_lean): a trainable one's weight gradient needs its inputs anyway.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# HF classes whose forward is exactly the one the lean forward below reproduces
GATED_SILU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
SILU = ("SiLU", "SiLUActivation")


class SiluMul(torch.autograd.Function):
    """silu(g) * u, keeping g and u only. The backward is autograd's own (the same ops in the same
    dtype: the same gradients, and no fp32 temporaries of the MLP's width)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


class RMSNormFrozen(torch.autograd.Function):
    """HF's Llama RMSNorm with a frozen weight, keeping the input in its own dtype and the fp32
    rstd per row; the normalised input is recomputed in fp32 for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        # the gradient of `weight * n.to(x.dtype)` with respect to n, rounded as autograd's cast rounds it
        dn = (grad * weight).to(x.dtype).float()
        dx = rstd * (dn - xhat * (dn * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


def silu_mlp_forward(self, x):
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def rms_norm_forward(self, hidden_states):
    return RMSNormFrozen.apply(hidden_states, self.weight, self.variance_epsilon)


def frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def lean_forward(module: torch.nn.Module):
    """The lean forward for a frozen module of one of the classes above, else None."""
    name = type(module).__name__
    if name in GATED_SILU_MLPS and type(module.act_fn).__name__ in SILU and frozen(module):
        return silu_mlp_forward
    if name in LLAMA_RMS_NORMS and frozen(module):
        return rms_norm_forward
    return None


def frozen_lean(model: torch.nn.Module) -> int:
    """Give every frozen module `lean_forward` knows its lean forward; returns how many."""
    n = 0
    for m in model.modules():
        forward = lean_forward(m)
        if forward is not None:
            m.forward = types.MethodType(forward, m)
            n += 1
    return n
