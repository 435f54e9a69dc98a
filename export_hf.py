"""Export a checkpoint to the transformers LLaVA format.

    python export_hf.py --checkpoint checkpoints/vision_trained_model.pt --output exported/
The folder then loads with LlavaForConditionalGeneration.from_pretrained(DIR) and
AutoProcessor.from_pretrained(DIR). Each part gives its own transformers config and weights
(llava_vision / llava_text): the built-in ViT as SiglipVisionModel (CLIPVisionModel for models of
the older "clip" layout) and the built-in decoder as LlamaForCausalLM (llava_layouts.py); Hugging
Face towers (CLIP, SigLIP) and causal LMs as they are, with LoRA adapters merged first.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from errors import ArgumentParser, UserError, cli
from model import VLM
from tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, PICTURE, USER, Tokenizer, with_content_lists

# The built-in chat template (tokenizer.py) in Jinja, behind the prelude that turns content lists
# ({"type": "image"} / {"type": "text"} parts) into <image> markers and text. A user turn's images
# go in front of its words, several of them each named 图1：, 图2：…, unless words stand between two of
# them (tokenizer.images_first). The image marker is <image>, or the one llama.cpp
# puts where an image goes (llama-mtmd-cli: <__media__>, llama-server: <__media_RANDOM__>): the GGUF
# export carries this same template. Only filters and methods llama.cpp's Jinja engine has are used.
BUILTIN_TEMPLATE = with_content_lists(
    "{{ bos_token }}{%- for m in messages -%}{%- set text = m['content'] -%}{%- if m['role'] == 'user' -%}"
    "{%- set mk = '<image>' -%}{%- if '<__media__>' in text -%}{%- set mk = '<__media__>' -%}"
    "{%- elif '<__media_' in text -%}{%- set mk = '<__media_' ~ text.split('<__media_')[1].split('__>')[0] ~ '__>' -%}"
    "{%- endif -%}{%- set ps = text.split(mk) -%}{%- set ns = namespace(lead=true, between=false, words=[], marks='') -%}"
    "{%- for p in ps -%}{%- if not loop.first -%}{%- set ns.marks = ns.marks ~ (('" + PICTURE.replace("{}", "' ~ loop.index0 ~ '")
    + "') if ps | length > 2 else '') ~ mk -%}{%- endif -%}"
    "{%- if not loop.last and p != '' -%}{%- set ns.lead = false -%}{%- endif -%}"
    "{%- if not loop.first and not loop.last and p.strip() -%}{%- set ns.between = true -%}{%- endif -%}"
    "{%- if p.strip() -%}{%- set ns.words = ns.words + [p.strip()] -%}{%- endif -%}{%- endfor -%}"
    "<|user|>{%- if ns.between -%}{{ text }}{%- else -%}{{ ns.marks }}{{ ps | last if ns.lead else ns.words | join(' ') }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>{{ text }}{{ eos_token }}{%- endif -%}"   # no system turns
    "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")


# ----------------------------------------------------------------------------- built-in tokenizer

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
    cfg, vision, lm = model.cfg, model.vision, model.lm
    vision_config, vision_sd = vision.llava_vision()
    text_config, decoder_sd, head = lm.llava_text()
    hf_tok = tok.hf if lm.source is not None else builtin_tokenizer(tok)     # an HF LM brings its own
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=cfg.image_token_id,
                         image_seq_length=cfg.image_tokens,
                         projector_hidden_act={"tanh": "gelu_pytorch_tanh", "none": "gelu"}[cfg.gelu],
                         vision_feature_select_strategy="default" if vision.has_cls else "full",
                         vision_feature_layer=vision.feature_layer, multimodal_projector_bias=True)
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
                               num_additional_image_tokens=1 if vision.has_cls else 0)
    return llava, processor


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_io_flags(p):
    """--checkpoint and --output, as every export command has them."""
    p.add_argument("--checkpoint", default="checkpoints/vision_trained_model.pt",
                   help="要导出的检查点 (默认: checkpoints/vision_trained_model.pt)")
    p.add_argument("--output", required=True, help="输出文件夹（不存在会自动创建）")


def output_folder(path: str) -> Path:
    """The export's folder: new or empty, never one whose files an export would mix with."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"输出位置 {out} 已存在且不是空文件夹。请换一个 --output，或先删除它。")
    return out


def build_parser():
    p = ArgumentParser(description="把训练好的检查点导出为 transformers 的 LLaVA 格式"
                                            "（LlavaForConditionalGeneration + AutoProcessor 可直接加载）。")
    add_io_flags(p)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="保存权重的精度 (默认: fp32)；bf16 文件小一半，GPU 上用 vLLM/SGLang 部署时推荐")
    return p


@cli
def main(argv=None):
    a = build_parser().parse_args(argv)
    out = output_folder(a.output)
    model, tok, _ = load_checkpoint(a.checkpoint)
    llava, processor = to_llava(model, tok)
    llava.to(DTYPES[a.dtype])
    try:
        llava.save_pretrained(out)
        processor.save_pretrained(out)
    except OSError as e:
        raise UserError(f"无法写入 {out}：{e.strerror or e}。请检查磁盘空间和写权限。") from e
    print(f"已导出到 {out}：可用 LlavaForConditionalGeneration.from_pretrained({str(out)!r}) "
          f"和 AutoProcessor.from_pretrained({str(out)!r}) 加载。")


if __name__ == "__main__":
    sys.exit(main())
