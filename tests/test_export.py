"""export_hf.py: the exported folder loads in transformers' LLaVA and computes what our model does."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import backbones
import export_hf
import tiny_hf
from images import normalise
from checkpoint import load_checkpoint, save_checkpoint
from collate import Collator
from model import VLM
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def export(checkpoint, out):
    return subprocess.run([sys.executable, "export_hf.py", "--checkpoint", str(checkpoint), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def perturbed(model):
    """Weights far from init (norms and biases too), so a wrong mapping shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def builtin_model(tok):
    torch.manual_seed(0)
    return perturbed(VLM(tiny_config(tok))), tok


def clip_llama_lora_model(tmp_path):
    model, tok = backbones.build_vlm(str(tiny_hf.save_clip(tmp_path / "clip")), str(tiny_hf.save_llama(tmp_path / "llama")))
    backbones.configure_training(model, "lora", 1e-3, lora_r=4)
    with torch.no_grad():                          # trained adapters: merging them must matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval(), tok


def picture(size):
    img = Image.new("RGB", (size, size), (200, 30, 30))
    img.paste((10, 200, 10), (0, 0, size // 2, size // 2))
    return img


def compare(model, tok, llava, processor, prompt_text, images=None):
    """Max |logit difference| on the images (default: one) + prompt; asserts the processor and
    greedy decoding agree."""
    images = images or [picture(model.cfg.vit_image_size)]
    batch = Collator(tok, model.cfg, train=False)([{"images": images, "messages": [{"role": "user", "content": "描述这张图片。"}]}])
    inputs = processor(images=images, text=prompt_text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()          # same template, same <image> expansion
    assert torch.allclose(inputs["pixel_values"], normalise(batch["pixels"], model.cfg), atol=1e-5)   # same preprocessing
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["pixels"])[1]
        theirs = llava(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    ours_tokens = [int(c[0]) for c in model.generate(batch["input_ids"], batch["pixels"], max_new_tokens=8)]
    if tok.eos_id in ours_tokens:
        ours_tokens = ours_tokens[:ours_tokens.index(tok.eos_id) + 1]
    their_tokens = llava.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert their_tokens == ours_tokens and len(set(ours_tokens)) > 1
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("kind", ["builtin", "clip+llama+lora"])
def test_export_round_trip_matches_logits_and_greedy_tokens(kind, tok, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, t = builtin_model(tok) if kind == "builtin" else clip_llama_lora_model(tmp_path)
    save_checkpoint(tmp_path / "m.pt", model, t, {"weights": "delta"} if kind != "builtin" else {})
    r = export(tmp_path / "m.pt", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LlavaForConditionalGeneration.from_pretrained" in r.stdout
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    model, t, _ = load_checkpoint(tmp_path / "m.pt")
    if kind == "builtin":
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片。"}]}],
                                             add_generation_prompt=True)
    else:
        text = t.hf.apply_chat_template([{"role": "user", "content": "<image>描述这张图片。"}], tokenize=False,
                                        add_generation_prompt=True)
    assert compare(model, t, llava, processor, text) < 1e-4


def test_siglip_qwen2_maps_to_the_full_feature_strategy(tmp_path):
    model, tok = backbones.build_vlm(str(tiny_hf.save_siglip(tmp_path / "s")), str(tiny_hf.save_qwen2(tmp_path / "q")))
    llava, processor = export_hf.to_llava(perturbed(model), tok)
    assert llava.config.vision_feature_select_strategy == "full" and llava.config.vision_feature_layer == -2
    text = tok.hf.apply_chat_template([{"role": "user", "content": "<image>描述这张图片。"}], tokenize=False,
                                      add_generation_prompt=True)
    assert compare(model, tok, llava.eval(), processor, text) < 1e-4


def test_export_refuses_a_non_empty_output_folder_and_a_missing_checkpoint(tok, tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pt", *builtin_model(tok))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    for args in (["--checkpoint", str(tmp_path / "m.pt"), "--output", str(tmp_path / "busy")],
                 ["--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "new")]):
        with pytest.raises(SystemExit) as e:
            export_hf.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("错误：") and len(err.strip().splitlines()) == 1
    assert (tmp_path / "busy" / "x").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_clip_tower_with_our_language_model(tok, tmp_path):
    ours, _ = builtin_model(tok)
    model, t = backbones.build_vlm(str(tiny_hf.save_clip(tmp_path / "clip")), base=(ours, tok))
    llava, processor = export_hf.to_llava(perturbed(model), t)
    assert llava.config.vision_feature_select_strategy == "default" and llava.config.text_config.model_type == "llama"
    text = processor.apply_chat_template([{"role": "user", "content": "<image>描述这张图片。"}], add_generation_prompt=True)
    assert compare(model, t, llava.eval(), processor, text) < 1e-4


@pytest.mark.parametrize("preset,layout", [("micro", "siglip"), ("micro", "clip"), ("tiny", "siglip")])
def test_builtin_presets_map_onto_siglip_or_clip_and_llama(preset, layout, tok):
    from model import PRESETS, VLMConfig
    torch.manual_seed(0)
    cfg = VLMConfig(**{**PRESETS[preset], "lm_vocab_size": tok.vocab_size, "image_token_id": tok.image_id,
                       "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                       "vit_layout": layout})
    model = perturbed(VLM(cfg))
    llava, processor = export_hf.to_llava(model, tok)
    assert type(llava.model.vision_tower).__name__.startswith({"siglip": "SiglipVision", "clip": "CLIPVision"}[layout])
    text = processor.apply_chat_template([{"role": "user", "content": "<image>描述这张图片。"}], add_generation_prompt=True)
    # our patch embedding is one matmul, CLIP's a convolution: the tiny preset's 3x24x24-long fp32
    # sums are added in another order (2.3e-4 measured; greedy tokens equal, checked in compare)
    assert compare(model, tok, llava.eval(), processor, text) < 5e-4


def test_exported_template_puts_images_first_like_ours(tok):
    """The exported chat template renders any order of text and image parts exactly as our
    tokenizer encodes it (images in front of a turn's words, unless words stand between two images)."""
    from export_hf import builtin_tokenizer
    hf = builtin_tokenizer(tok)
    cases = [([{"type": "text", "text": "描述这张图片。"}, {"type": "image"}], 1),
             ([{"type": "image"}, {"type": "text", "text": "描述这张图片。"}], 1),
             ([{"type": "text", "text": "左边 "}, {"type": "image"}, {"type": "text", "text": " 和右边"}, {"type": "image"}], 2),
             ([{"type": "text", "text": "看 "}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": "哪张？"}], 2),
             ("图1：<image>图2：<image>哪张图里有红色的圆形？", 2),
             ("描述这张图片<image>", 1)]
    for content, n in cases:
        text = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        plain = content if isinstance(content, str) else "".join(p.get("text", "<image>") for p in content)
        ours, _ = tok.encode_chat([{"role": "user", "content": plain}], 1, n, add_generation_prompt=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, (content, text)
        for marker in ("<__media__>", "<__media_x7Yz__>"):   # llama-mtmd-cli's and llama-server's image markers
            theirs = hf.apply_chat_template([{"role": "system", "content": "不出现"},
                                             {"role": "user", "content": plain.replace("<image>", marker)}],
                                            tokenize=False, add_generation_prompt=True)
            assert theirs.replace(marker, "<image>") == text, (marker, theirs)


@pytest.mark.parametrize("kind", ["clip+llama-without-template", "siglip+qwen2"])
def test_transformers_multimodal_chat_call_works_on_hf_llm_exports(kind, tmp_path):
    """processor.apply_chat_template with content lists (transformers' and vLLM's standard call)
    renders <image> inside the LLM's own template (or our fallback), and greedy tokens equal ours."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    if kind == "siglip+qwen2":
        parts = tiny_hf.save_siglip(tmp_path / "v"), tiny_hf.save_qwen2(tmp_path / "l")
    else:
        parts = tiny_hf.save_clip(tmp_path / "v"), tiny_hf.save_llama(tmp_path / "l", template=False)
    model, tok = backbones.build_vlm(*map(str, parts))
    save_checkpoint(tmp_path / "m.pt", perturbed(model), tok, {"weights": "delta"})
    export_hf.main(["--checkpoint", str(tmp_path / "m.pt"), "--output", str(tmp_path / "hf")])
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    model, tok, _ = load_checkpoint(tmp_path / "m.pt")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片。"}]}],
        add_generation_prompt=True)
    assert "[{" not in text and text.count("<image>") == 1
    assert compare(model, tok, llava, processor, text) < 1e-4
    # several images and turns: the processor's ids equal what training encodes
    chat = [{"role": "user", "content": [{"type": "text", "text": "左边"}, {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
            {"role": "user", "content": "What is in the picture?"}]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
    theirs = processor(images=[picture(32)] * 2, text=rendered, return_tensors="pt")["input_ids"][0].tolist()
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              "".join(p.get("text", "<image>") for p in m["content"])} for m in chat]
    assert theirs == tok.encode_chat(plain, model.cfg.image_tokens, 2, add_generation_prompt=True)[0]


def test_export_in_bf16_writes_half_size_safetensors(tok, tmp_path):
    from transformers import LlavaForConditionalGeneration
    save_checkpoint(tmp_path / "m.pt", *builtin_model(tok))
    for dtype in ("fp32", "bf16"):
        export_hf.main(["--checkpoint", str(tmp_path / "m.pt"), "--output", str(tmp_path / dtype), "--dtype", dtype])
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("fp32", "bf16")}
    assert size["fp32"] > 0 and abs(size["bf16"] / size["fp32"] - 0.5) < 0.02
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16")
    assert llava.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["builtin", "siglip+qwen2"])
def test_exported_model_answers_a_two_image_prompt_like_ours(kind, tok, tmp_path):
    """Two images in one turn: the processor expands both placeholders as we do, and the exported
    model's logits and greedy tokens equal ours."""
    if kind == "builtin":
        model, t = builtin_model(tok)
    else:
        model, t = backbones.build_vlm(str(tiny_hf.save_siglip(tmp_path / "s")), str(tiny_hf.save_qwen2(tmp_path / "q")))
        model = perturbed(model)
    llava, processor = export_hf.to_llava(model, t)
    size = model.cfg.vit_image_size
    images = [picture(size), picture(size).transpose(Image.Transpose.ROTATE_90)]
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "描述这张图片。"}]}], add_generation_prompt=True)
    assert text.count("<image>") == 2
    assert compare(model, t, llava.eval(), processor, text, images) < 1e-4
