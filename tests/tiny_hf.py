"""Tiny random Hugging Face backbones saved to folders, as a user's downloads would be (never
downloaded: built from configs, tokenizers trained on a few sentences)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from backbones import quiet_transformers

quiet_transformers()                                  # no progress bars from save_pretrained

TEXTS = ["a red circle on the left", "two blue squares", "描述这张图片。", "图中有一个红色的圆形。",
         "What is in the picture?", "there is a green triangle at the top right"] * 20

LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                   "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bpe(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_llama(path: Path, seed: int = 0, template: bool = True, **config) -> Path:
    """template=False: a base model that ships without a chat template; config: LlamaConfig
    fields that differ from the tiny defaults (e.g. hidden_size, head_dim)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>")
    tok.chat_template = LLAMA_TEMPLATE if template else None
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False), **config}))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_qwen2(path: Path, seed: int = 0, device: str = "cpu", dtype=torch.float32, **config) -> Path:
    """config: Qwen2Config fields that differ from the tiny defaults (bench/bench_real.py builds
    Qwen2.5 shapes this way, on a GPU and saved in bf16 for the large ones)."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**{**dict(
            vocab_size=len(tok) + 16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True), **config}))
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_clip(path: Path, seed: int = 0, full: bool = False, **vision) -> Path:
    """full=True saves a whole CLIPModel (both towers), like openai/clip-vit-base-patch16 on the hub;
    vision: CLIPVisionConfig fields that differ from the tiny defaults (e.g. CLIP-B/16's)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    vcfg = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                   patch_size=8), **vision}
    if full:
        model = CLIPModel(CLIPConfig(vision_config=vcfg, text_config=dict(hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=99), projection_dim=16))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vcfg))
    model.save_pretrained(path)
    side = vcfg["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)
    return path


def save_siglip(path: Path, seed: int = 0) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
