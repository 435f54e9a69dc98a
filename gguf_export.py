"""A checkpoint as GGUF files for llama.cpp and Ollama (export_gguf.py is the command).

  model-<quant>.gguf   the language model: llama.cpp's "llama" (or "qwen2") architecture, with the
                       tokenizer (byte-level BPE, "gpt2" model) and the chat template
  mmproj-<quant>.gguf  vision tower + projector: "clip" architecture, projector type "mlp" (the
                       graph llama.cpp runs LLaVA-1.5's two-layer MLP with)

Both come from the configs and weights the LLaVA export uses (llava_vision / llava_text, see
llava_layouts.py), renamed with gguf-py's tensor name maps. f16 and q8_0 are written here (gguf-py);
q4_k_m is made from an f32 file by llama.cpp's own quantizer (llama-cpp-python), which also picks
the fallback types for rows too short for K-quants, as llama-quantize does.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import torch

from errors import UserError

QUANTS = ("f16", "q8_0", "q4_k_m")
Q4_K_M = 15                      # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}          # transformers model_type -> llama.cpp architecture
CLS_BUG = ("llama.cpp 的 LLaVA 计算图目前把 CLS token 放错位置（ggml-org/llama.cpp#25814），导出的模型会看错图")


def gguf_types(quant: str):
    """(llama.cpp file type, the type weight matrices get) for f32 / f16 / q8_0."""
    import gguf
    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (f.ALL_F32, t.F32), "f16": (f.MOSTLY_F16, t.F16), "q8_0": (f.MOSTLY_Q8_0, t.Q8_0)}[quant]


def as_dict(config) -> dict:
    """A part's config: the dict llava_layouts gives, or a transformers config object."""
    return config if isinstance(config, dict) else config.to_dict()


# ----------------------------------------------------------------------------- tensors

def tensor_type(name: str, ndim: int, wanted):
    """llama.cpp's converter's rule: vectors, norms, non-weights and position tables stay f32; the
    patch embedding is f16 (f32 unless the file is f16); other matrices get the file's type."""
    import gguf
    t = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or ".position_embd." in name:
        return t.F32
    if ".patch_embd." in name:
        return t.F16 if wanted == t.F16 else t.F32
    return wanted


def add_tensors(writer, tensors: dict, wanted):
    import gguf
    for name, value in tensors.items():
        array = value.detach().float().cpu().numpy()
        qtype = tensor_type(name, array.ndim, wanted)
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:          # rows not a multiple of the block: f16, as llama.cpp's converter does
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)


def renamed(tensors: dict, arch, n_blocks: int, prefix: str) -> dict:
    """transformers' names -> GGUF names (gguf-py's map for the architecture); a name it has no
    entry for stops the export (llama.cpp would not know the weight)."""
    import gguf
    names = gguf.get_tensor_name_map(arch, n_blocks)
    new = {key: names.get_name(prefix + key, try_suffixes=(".weight", ".bias")) for key in tensors}
    if None in new.values():
        raise UserError(f"有 GGUF 表达不了的权重：{sorted(k for k, v in new.items() if v is None)[:4]}。")
    return {new[key]: value for key, value in tensors.items()}


def rope_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half RoPE order to llama.cpp's interleaved "llama" order
    (what convert_hf_to_gguf.py's LlamaModel.permute does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(path: Path, arch: str, kind: str, fill) -> Path:
    """One GGUF file: fill(writer) adds its keys and tensors."""
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(kind)
    fill(writer)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as e:
        raise UserError(f"无法写入 {path}：{e.strerror or e}。请检查磁盘空间和写权限。") from e
    finally:
        writer.close()
    return path


# ----------------------------------------------------------------------------- language model

def text_model(path: Path, model, tok, quant: str) -> Path:
    import gguf

    import gguf_vocab
    config, decoder, head = model.lm.llava_text()
    c = as_dict(config)
    arch = GGUF_ARCH.get(c["model_type"])
    if arch is None:
        raise UserError(f"语言模型的类型是 {c['model_type']}；GGUF 导出目前支持 Llama 和 Qwen2 结构的语言模型。")
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"语言模型用了 {rope['rope_type']} 类型的 RoPE 缩放，GGUF 导出暂不支持。")
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    tensors = dict(decoder)
    if arch == "llama":                                  # llama.cpp's llama graph rotates interleaved pairs
        for key in [k for k in tensors if k.endswith(("q_proj.weight", "k_proj.weight"))]:
            tensors[key] = rope_interleaved(tensors[key], heads if "q_proj" in key else kv_heads)
    ftype, wanted = gguf_types("f32" if quant == "q4_k_m" else quant)
    n_vocab = head.shape[0]

    def fill(w):
        w.add_name("vlm-language-model")
        w.add_file_type(ftype)
        w.add_context_length(c["max_position_embeddings"])
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_block_count(c["num_hidden_layers"])
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_vocab_size(n_vocab)
        gguf_vocab.add_vocab(w, model, tok, n_vocab)
        named = renamed(tensors, gguf.MODEL_ARCH[arch.upper()], c["num_hidden_layers"], "model.")
        if not c.get("tie_word_embeddings"):             # tied: llama.cpp reads token_embd as the output
            named["output.weight"] = head
        add_tensors(w, named, wanted)

    return write(path, arch, "model", fill)


# ----------------------------------------------------------------------------- vision + projector

def feature_depth(vision, n_layers: int) -> int:
    """How many blocks the features come out of (hidden_states[feature_layer] in transformers' count)."""
    return vision.feature_layer % (n_layers + 1)


def mmproj(path: Path, model, quant: str) -> Path:
    import gguf
    vision, cfg = model.vision, model.cfg
    if vision.has_cls:
        hint = ("请换用 SigLIP 视觉塔" if vision.source else
                "这是旧结构（vit_layout=clip）的检查点，请用当前版本重新训练（python train_vision.py）")
        raise UserError(f"这个模型的视觉编码器带 CLS token，{CLS_BUG}。{hint}。")
    config, weights = vision.llava_vision()
    c = as_dict(config)
    if c.get("hidden_act") != "gelu_pytorch_tanh" or cfg.gelu != "tanh":
        raise UserError("视觉部分用的是精确 GELU，llama.cpp 的 LLaVA 计算图只有 tanh 近似的 GELU；"
                        "请用当前版本重新训练后再导出。")
    depth = feature_depth(vision, c["num_hidden_layers"])
    names = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    kept = {k: v for k, v in names.items()
            if not k.startswith(("post_layernorm", "head")) and not (k.startswith("encoder.layers.")
                                                                  and int(k.split(".")[2]) >= depth)}
    tensors = renamed(kept, gguf.MODEL_ARCH.MMPROJ, depth, "vision_tower.vision_model.")
    p = model.projector
    tensors.update({"mm.0.weight": p.fc1.weight, "mm.0.bias": p.fc1.bias, "mm.2.weight": p.fc2.weight,
                    "mm.2.bias": p.fc2.bias})
    ftype, wanted = gguf_types(quant)

    def fill(w):
        w.add_name("vlm-mmproj")
        w.add_file_type(ftype)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type("mlp")
        w.add_vision_image_size(cfg.vit_image_size)
        w.add_vision_patch_size(cfg.vit_patch_size)
        w.add_vision_embedding_length(c["hidden_size"])
        w.add_vision_feed_forward_length(c["intermediate_size"])
        w.add_vision_block_count(depth)
        w.add_vision_head_count(c["num_attention_heads"])
        w.add_vision_attention_layernorm_eps(c["layer_norm_eps"])
        w.add_vision_projection_dim(cfg.lm_dim)
        w.add_vision_image_mean(list(cfg.vit_image_mean))
        w.add_vision_image_std(list(cfg.vit_image_std))
        w.add_vision_use_gelu(True)                         # tanh GELU (ggml_gelu)
        w.add_array("clip.vision.feature_layer", [depth])    # else llama.cpp stops one block early
        add_tensors(w, tensors, wanted)

    return write(path, "clip", "mmproj", fill)


# ----------------------------------------------------------------------------- quantising, reading back

def quantize_q4_k_m(src: Path, dst: Path, threads: int = 0):
    """llama.cpp's quantizer (llama_model_quantize, through llama-cpp-python) from an f32 file."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("q4_k_m 需要 llama.cpp 的量化器：pip install llama-cpp-python（见 requirements-dev.txt），"
                        f"或先导出 f16，再用 llama.cpp 的 llama-quantize model-f16.gguf {dst.name} Q4_K_M。") from None
    from llama_cpp._logger import set_verbose
    set_verbose(False)                                  # its per-tensor lines: errors only
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_K_M
    params.nthread = threads or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise UserError(f"llama.cpp 量化 {src.name} 失败。")


def contents(path: Path) -> dict:
    """{tensor type: count} of a GGUF file, as written (what a quantisation really holds)."""
    import gguf
    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def export(model, tok, out: Path, quant: str) -> dict:
    """Write the model, mmproj; returns {file name: tensor types}."""
    out.mkdir(parents=True, exist_ok=True)
    vision = mmproj(out / f"mmproj-{'q8_0' if quant == 'q8_0' else 'f16'}.gguf", model,
                    "q8_0" if quant == "q8_0" else "f16")
    target = out / f"model-{quant}.gguf"
    if quant == "q4_k_m":
        tmp = out / "model-f32.tmp.gguf"
        try:
            text_model(tmp, model, tok, quant)
            quantize_q4_k_m(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        text_model(target, model, tok, quant)
    return {p.name: contents(p) for p in (target, vision)}
