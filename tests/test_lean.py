"""lean.py: frozen HF decoder blocks give the same outputs and input gradients with less kept for
the backward."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lean import RMSNormFrozen, SiluMul, frozen_lean

SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)


def frozen_pair(cls, config_cls, dtype):
    """(HF model, its lean copy), weights frozen and stored in `dtype` (matrices only, as
    devices.store_frozen_in stores them)."""
    torch.manual_seed(0)
    hf = cls(config_cls(**SHAPE, rms_norm_eps=1e-5)).requires_grad_(False)
    for p in hf.parameters():
        p.data = p.data.to(dtype) if p.ndim >= 2 else p.data.uniform_(0.5, 1.5)     # norms: not all ones
    lean = copy.deepcopy(hf)
    assert frozen_lean(lean) == 2 * 2 + 2 + 1                     # per layer an MLP and 2 norms; the final norm
    return hf, lean


def run(model, embeds, autocast: bool):
    x = embeds.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs_embeds=x).logits
    logits.float().square().mean().backward()
    return logits, x.grad


@pytest.mark.parametrize("cls,config_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_bf16_frozen_model_same_logits_and_input_gradients(cls, config_cls):
    """The training case: bf16 weights under bf16 autocast. The forward is bit-identical; the
    norm's backward rounds once (fp32 inside) where autograd rounds after each op."""
    hf, lean = frozen_pair(cls, config_cls, torch.bfloat16)
    embeds = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    (want, want_grad), (got, got_grad) = run(hf, embeds, True), run(lean, embeds, True)
    assert torch.equal(got, want)
    assert torch.allclose(got_grad.float(), want_grad.float(), rtol=0.05, atol=1e-3 * want_grad.abs().max().item())


def test_fp32_frozen_model_gradients_match_autograd():
    hf, lean = frozen_pair(LlamaForCausalLM, LlamaConfig, torch.float32)
    embeds = torch.randn(2, 7, 64)
    (want, want_grad), (got, got_grad) = run(hf, embeds, False), run(lean, embeds, False)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())


def test_silu_mul_passes_gradcheck_in_fp64():
    g, u = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))


def test_rms_norm_gradient_matches_autograd_of_hf_norm():
    """HF's norm computes in fp32 whatever its input (so no fp64 gradcheck): compared in fp32."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(8, eps=1e-6).requires_grad_(False)
    norm.weight.data.uniform_(0.5, 1.5)
    x, grad = torch.randn(3, 8) * 3, torch.randn(3, 8)
    want = torch.autograd.grad(norm(x.requires_grad_(True)), x, grad)[0]
    y = RMSNormFrozen.apply(x, norm.weight, 1e-6)
    assert torch.equal(y, norm(x))
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], want, rtol=1e-6, atol=1e-6)


def saved_bytes(model, embeds) -> int:
    """Bytes of the distinct activations autograd keeps for the backward (weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(inputs_embeds=embeds.requires_grad_(True))
    return sum(kept.values())


def test_lean_blocks_keep_less_for_the_backward():
    """Per token and layer: the MLP keeps 2 intermediate-wide bf16 tensors, not 3; each norm its
    bf16 input, not an fp32 copy (the final norm too)."""
    hf, lean = frozen_pair(LlamaForCausalLM, LlamaConfig, torch.bfloat16)
    embeds = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    tokens, layers = 2 * 7, 2
    saving = tokens * (layers * (176 * 2 + 2 * 64 * 2) + 64 * 2)
    assert saved_bytes(hf, embeds) - saved_bytes(lean, embeds) == saving


def test_trainable_modules_keep_hf_forward():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)       # as a LoRA / --train all block
    model.model.layers[1].input_layernorm.weight.requires_grad_(True)
    assert frozen_lean(model) == 2 * 2 + 2 + 1 - 2
    assert "forward" not in vars(model.model.layers[0].mlp) and "forward" in vars(model.model.layers[1].mlp)
    assert "forward" not in vars(model.model.layers[1].input_layernorm)


def test_bf16_mlp_gradients_are_hf_autograds_exactly():
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    hf = LlamaMLP(LlamaConfig(**SHAPE)).requires_grad_(False).to(torch.bfloat16)
    lean = copy.deepcopy(hf)
    assert frozen_lean(lean) == 1
    x, grad = torch.randn(2, 7, 64, dtype=torch.bfloat16), torch.randn(2, 7, 64, dtype=torch.bfloat16)
    want, got = hf(x.requires_grad_(True)), lean(x)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
