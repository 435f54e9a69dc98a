"""How the built-in ViT and decoder map onto transformers' classes: configs and weights under
their names. The LLaVA export (export_hf.py) loads them into LlavaForConditionalGeneration; the
GGUF export (gguf_export.py) renames them for llama.cpp. Same layouts, only fused weights split.

  VisionEncoder "siglip" layout -> SiglipVisionModel (LLaVA's "full" strategy)
  VisionEncoder "clip" layout   -> CLIPVisionModel (CLS dropped: LLaVA's "default" strategy)
  LanguageModel                 -> LlamaForCausalLM (tied embeddings)
"""
from __future__ import annotations

import torch


def vision(enc) -> tuple[dict, dict]:
    """(vision config fields, weights under the vision model's names) for a model.VisionEncoder."""
    c, p = enc.cfg, "vision_model."
    clip = enc.has_cls
    config = dict(model_type="clip_vision_model" if clip else "siglip_vision_model", hidden_size=c.vit_dim,
                  num_hidden_layers=c.vit_layers, intermediate_size=int(c.vit_dim * c.vit_mlp_ratio),
                  num_attention_heads=c.vit_heads, image_size=c.vit_image_size, patch_size=c.vit_patch_size,
                  hidden_act="gelu" if clip else "gelu_pytorch_tanh", layer_norm_eps=1e-5)  # nn.LayerNorm's eps
    dim = c.vit_dim
    sd = {p + "embeddings.patch_embedding.weight": enc.patch_embed.weight,
          p + "embeddings.position_embedding.weight": enc.pos,
          # the post-LayerNorm only feeds the pooled output, which LLaVA does not use
          p + "post_layernorm.weight": torch.ones(dim), p + "post_layernorm.bias": torch.zeros(dim)}
    if clip:
        sd.update({p + "embeddings.class_embedding": enc.cls, p + "pre_layrnorm.weight": enc.pre_norm.weight,
                   p + "pre_layrnorm.bias": enc.pre_norm.bias})
    else:
        config["vision_use_head"] = False
        sd[p + "embeddings.patch_embedding.bias"] = torch.zeros(dim)     # SigLIP's patch embedding has one
    for i, b in enumerate(enc.blocks):
        layer = f"{p}encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b.qkv.weight.chunk(3), b.qkv.bias.chunk(3)):
            sd[f"{layer}self_attn.{name}.weight"], sd[f"{layer}self_attn.{name}.bias"] = w, bias
        for ours, theirs in (("out", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                             ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            sd[f"{layer}{theirs}.weight"], sd[f"{layer}{theirs}.bias"] = getattr(b, ours).weight, getattr(b, ours).bias
    return config, sd


def text(lm) -> tuple[dict, dict, torch.Tensor]:
    """(LlamaConfig fields, weights under LlamaModel's names, lm_head weight) for a model.LanguageModel."""
    c = lm.cfg
    hd = c.lm_dim // c.lm_heads
    config = dict(model_type="llama", vocab_size=c.lm_vocab_size, hidden_size=c.lm_dim,
                  intermediate_size=c.lm_hidden, num_hidden_layers=c.lm_layers, num_attention_heads=c.lm_heads,
                  num_key_value_heads=c.lm_kv_heads, max_position_embeddings=c.lm_max_len,
                  rms_norm_eps=c.lm_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.lm_rope_theta},
                  tie_word_embeddings=True, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                  pad_token_id=c.pad_token_id)
    sd = {"embed_tokens.weight": lm.embed.weight, "norm.weight": lm.norm.weight}
    for i, b in enumerate(lm.blocks):
        q, k, v = b.qkv.weight.split([c.lm_heads * hd, c.lm_kv_heads * hd, c.lm_kv_heads * hd])
        gate, up = b.gate_up.weight.chunk(2)
        sd.update({f"layers.{i}.{name}.weight": w for name, w in (
            ("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v), ("self_attn.o_proj", b.o.weight),
            ("mlp.gate_proj", gate), ("mlp.up_proj", up), ("mlp.down_proj", b.down.weight),
            ("input_layernorm", b.attn_norm.weight), ("post_attention_layernorm", b.mlp_norm.weight))})
    return config, sd, lm.embed.weight
