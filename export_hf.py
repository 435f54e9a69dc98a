"""Export a checkpoint to the transformers LLaVA format.

    python export_hf.py --checkpoint checkpoints/vision_trained_model.pt --output exported/
The folder then loads with LlavaForConditionalGeneration.from_pretrained(DIR) and
AutoProcessor.from_pretrained(DIR). The built-in ViT maps onto CLIPVisionModel and the built-in
decoder onto LlamaForCausalLM (the layouts in model.py were chosen for this); Hugging Face towers
(CLIP, SigLIP) and causal LMs are copied as they are, with LoRA adapters merged first.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from errors import ArgumentParser, UserError, cli
from model import VLM, LanguageModel, VisionEncoder, VLMConfig
from tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, USER, Tokenizer

# The built-in chat template (tokenizer.py) in Jinja; content may be a string with <image>
# markers or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
BUILTIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}{% else %}{% set text = namespace(s='') %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}{% set text.s = text.s + '<image>' %}"
    "{% else %}{% set text.s = text.s + part['text'] %}{% endif %}{% endfor %}{% set text = text.s %}{% endif %}"
    "{% if m['role'] == 'user' %}<|user|>{{ text }}{% else %}<|assistant|>{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ----------------------------------------------------------------------------- built-in parts

def clip_vision_config(cfg: VLMConfig):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=cfg.vit_dim, intermediate_size=int(cfg.vit_dim * cfg.vit_mlp_ratio),
                            num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                            image_size=cfg.vit_image_size, patch_size=cfg.vit_patch_size,
                            hidden_act="gelu", layer_norm_eps=1e-5)   # exact GELU, nn.LayerNorm's eps


def vit_to_clip(vit: VisionEncoder) -> dict:
    """Our ViT's weights under CLIPVisionModel's names (fused qkv split into q/k/v)."""
    p = "vision_model."
    sd = {p + "embeddings.patch_embedding.weight": vit.patch_embed.weight,
          p + "embeddings.class_embedding": vit.cls,
          p + "embeddings.position_embedding.weight": vit.pos,
          p + "pre_layrnorm.weight": vit.pre_norm.weight, p + "pre_layrnorm.bias": vit.pre_norm.bias,
          # post_layernorm only feeds CLIP's pooled output, which LLaVA does not use
          p + "post_layernorm.weight": torch.ones_like(vit.pre_norm.weight),
          p + "post_layernorm.bias": torch.zeros_like(vit.pre_norm.bias)}
    for i, b in enumerate(vit.blocks):
        layer = f"{p}encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), b.qkv.weight.chunk(3), b.qkv.bias.chunk(3)):
            sd[f"{layer}self_attn.{name}.weight"], sd[f"{layer}self_attn.{name}.bias"] = w, bias
        for ours, theirs in (("out", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                             ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            sd[f"{layer}{theirs}.weight"] = getattr(b, ours).weight
            sd[f"{layer}{theirs}.bias"] = getattr(b, ours).bias
    return sd


def llama_config(cfg: VLMConfig):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.lm_vocab_size, hidden_size=cfg.lm_dim, intermediate_size=cfg.lm_hidden,
                       num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                       num_key_value_heads=cfg.lm_kv_heads, max_position_embeddings=cfg.lm_max_len,
                       rms_norm_eps=cfg.lm_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.lm_rope_theta},
                       tie_word_embeddings=True, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id)


def lm_to_llama(lm: LanguageModel) -> dict:
    """Our decoder's weights under LlamaModel's names (fused qkv and gate_up split)."""
    c = lm.cfg
    hd = c.lm_dim // c.lm_heads
    sd = {"embed_tokens.weight": lm.embed.weight, "norm.weight": lm.norm.weight}
    for i, b in enumerate(lm.blocks):
        layer = f"layers.{i}."
        q, k, v = b.qkv.weight.split([c.lm_heads * hd, c.lm_kv_heads * hd, c.lm_kv_heads * hd])
        gate, up = b.gate_up.weight.chunk(2)
        sd.update({layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
                   layer + "self_attn.v_proj.weight": v, layer + "self_attn.o_proj.weight": b.o.weight,
                   layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
                   layer + "mlp.down_proj.weight": b.down.weight,
                   layer + "input_layernorm.weight": b.attn_norm.weight,
                   layer + "post_attention_layernorm.weight": b.mlp_norm.weight})
    return sd


def builtin_tokenizer(tok: Tokenizer):
    """Our BPE as a PreTrainedTokenizerFast that reads <image> and the other markers as tokens."""
    from transformers import PreTrainedTokenizerFast
    inner = Tokenizer.from_str(tok.to_str()).tok
    inner.encode_special_tokens = False               # the processor writes <image> into the text
    hf = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 extra_special_tokens={"image_token": IMAGE}, padding_side="left")
    hf.add_special_tokens({"additional_special_tokens": [IMAGE, USER, ASSISTANT]})
    hf.chat_template = BUILTIN_TEMPLATE
    return hf


# ----------------------------------------------------------------------------- assembling

def to_llava(model: VLM, tok):
    """(LlavaForConditionalGeneration, LlavaProcessor) holding the same function as `model`."""
    import backbones
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    backbones.quiet_transformers()
    cfg = model.cfg
    if isinstance(model.vision, VisionEncoder):
        vision_config, vision_sd, layer, has_cls = clip_vision_config(cfg), vit_to_clip(model.vision), -1, True
    else:
        tower = model.vision
        if tower.kind == "siglip2":
            raise UserError("SigLIP2 视觉塔（NaFlex）没有对应的 LLaVA 格式，暂不能导出；请改用 CLIP 或 SigLIP 视觉塔。")
        vision_config, vision_sd = tower.model.config, tower.model.state_dict()
        layer, has_cls = tower.feature_layer, tower.kind == "clip"
    if isinstance(model.lm, LanguageModel):
        text_config, decoder_sd, head = llama_config(cfg), lm_to_llama(model.lm), model.lm.embed.weight
        hf_tok = builtin_tokenizer(tok)
    else:
        causal = model.lm.merged()                          # LoRA folded into the weights
        text_config, decoder_sd = causal.config, causal.get_decoder().state_dict()
        head, hf_tok = causal.get_output_embeddings().weight, tok.hf
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=cfg.image_token_id,
                         image_seq_length=cfg.image_tokens, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default" if has_cls else "full",
                         vision_feature_layer=layer, multimodal_projector_bias=True)
    llava = LlavaForConditionalGeneration(config).eval()
    inner = llava.model
    with torch.no_grad():
        if not any(k.startswith("vision_model.") for k in inner.vision_tower.state_dict()):
            vision_sd = {k.removeprefix("vision_model."): v for k, v in vision_sd.items()}   # a bare transformer
        inner.vision_tower.load_state_dict(vision_sd, strict=True)
        inner.multi_modal_projector.linear_1.load_state_dict(model.projector.fc1.state_dict())
        inner.multi_modal_projector.linear_2.load_state_dict(model.projector.fc2.state_dict())
        inner.language_model.load_state_dict(decoder_sd, strict=True)
        llava.lm_head.weight.copy_(head)
    llava.generation_config.eos_token_id = cfg.eos_token_id
    llava.generation_config.pad_token_id = cfg.pad_token_id
    llava.generation_config.bos_token_id = cfg.bos_token_id
    size = cfg.vit_image_size
    image_processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                         crop_size={"height": size, "width": size},
                                         image_mean=list(cfg.vit_image_mean), image_std=list(cfg.vit_image_std))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=hf_tok, patch_size=cfg.vit_patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=hf_tok.chat_template, image_token=IMAGE,
                               num_additional_image_tokens=1 if has_cls else 0)
    return llava, processor


def build_parser():
    p = ArgumentParser(description="把训练好的检查点导出为 transformers 的 LLaVA 格式"
                                            "（LlavaForConditionalGeneration + AutoProcessor 可直接加载）。")
    p.add_argument("--checkpoint", default="checkpoints/vision_trained_model.pt",
                   help="要导出的检查点 (默认: checkpoints/vision_trained_model.pt)")
    p.add_argument("--output", required=True, help="输出文件夹（不存在会自动创建）")
    return p


@cli
def main(argv=None):
    a = build_parser().parse_args(argv)
    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"输出位置 {out} 已存在且不是空文件夹。请换一个 --output，或先删除它。")
    model, tok, _ = load_checkpoint(a.checkpoint)
    llava, processor = to_llava(model, tok)
    try:
        llava.save_pretrained(out)
        processor.save_pretrained(out)
    except OSError as e:
        raise UserError(f"无法写入 {out}：{e.strerror or e}。请检查磁盘空间和写权限。") from e
    print(f"已导出到 {out}：可用 LlavaForConditionalGeneration.from_pretrained({str(out)!r}) "
          f"和 AutoProcessor.from_pretrained({str(out)!r}) 加载。")


if __name__ == "__main__":
    sys.exit(main())
