"""The tokenizer and chat template as GGUF keys, so llama.cpp tokenizes and renders prompts as we do.

llama.cpp's byte-level BPE ("gpt2" model) takes the token list, their types, the merges and a
pre-tokenizer named in tokenizer.ggml.pre: a fixed list of split rules, chosen by that name (no
rules can be carried in the file). So a tokenizer exports only when its pre-tokenizer is one of
those, exactly: the built-in tokenizer splits like GPT-2 ("gpt-2"); a Hugging Face tokenizer.json
is compared with the ones llama.cpp's converter maps to a name (PRE_TOKENIZERS).
"""
from __future__ import annotations

import json

from errors import UserError
from tokenizer import SPECIALS

GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5        # llama.cpp's token types


def bpe_tables(spec: dict, n_vocab: int, special: set[str]) -> tuple[list, list, list]:
    """(tokens, types, merges) from a tokenizer.json dict, padded to n_vocab with unused entries
    (the embedding may have more rows than the tokenizer has tokens, as convert_hf_to_gguf pads)."""
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") not in ("ByteLevel", None):
        raise UserError("分词器不是字节级 BPE，llama.cpp 的 gpt2 分词器表达不了。")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) > n_vocab or max(by_id) >= n_vocab:
        raise UserError(f"分词器有 {len(by_id)} 个 token，多于语言模型的 {n_vocab} 行词嵌入。")
    added = {t["content"]: t.get("special", False) for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        tokens.append(t if t is not None else f"[PAD{i}]")
        types.append(UNUSED if t is None else CONTROL if t in special or added.get(t) else
                     USER_DEFINED if t in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


# tokenizer.json split rules (split_rules) -> the tokenizer.ggml.pre name llama.cpp runs them under
# (llama-vocab.cpp quotes these regexes as the "original regex from tokenizer.json")
LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
          "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {("gpt2",): "gpt-2", (LLAMA3.replace("{1,3}", ""),): "qwen2", (LLAMA3,): "llama-bpe"}


def split_rules(spec: dict) -> tuple:
    """A tokenizer.json's pre-tokenizer as its split rules: each isolating Split's regex, "gpt2" for
    a ByteLevel step that splits with GPT-2's regex; anything else as itself (matches no name)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    rules = []
    for step in steps:
        if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            rules.append(step.get("pattern", {}).get("Regex"))
        elif step.get("type") == "ByteLevel" and not step.get("add_prefix_space"):
            rules += ["gpt2"] if step.get("use_regex", True) else []
        else:
            rules.append(json.dumps(step, sort_keys=True))
    return tuple(rules)


def hf_tokenizer(tok) -> tuple[dict, str, bool, str]:
    """(tokenizer.json, pre name, add BOS?, chat template) of a Hugging Face LLM's tokenizer."""
    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    pre = PRE_TOKENIZERS.get(split_rules(spec))
    # NFC (Qwen2's normalizer) changes only text that is not NFC already; llama.cpp does not normalise
    if (pre is None or (spec.get("normalizer") or {"type": "NFC"}) != {"type": "NFC"}
            or bool(spec["model"].get("ignore_merges")) != (pre == "llama-bpe")):
        raise UserError("这个语言模型的分词器切分规则不在 llama.cpp 认得的几种里（GPT-2、Llama 3、Qwen2），"
                        "llama.cpp 无法按同样的方式分词，不能导出为 GGUF。")
    bos = tok.hf.bos_token
    rendered = tok.hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return spec, pre, bool(bos) and rendered.startswith(bos), tok.hf.chat_template


def builtin_tokenizer(tok) -> tuple[dict, str, bool, str]:
    from export_hf import BUILTIN_TEMPLATE
    spec = json.loads(tok.to_str())
    if spec.get("pre_tokenizer") != GPT2_SPLIT:
        raise UserError("这个检查点的分词器先把汉字单独切开再做 BPE（旧版本），llama.cpp 的分词器做不到完全一样；"
                        "请用当前版本重新训练（python train_vision.py）后再导出。")
    return spec, "gpt-2", True, BUILTIN_TEMPLATE


def add_vocab(writer, model, tok, n_vocab: int):
    """Tokenizer keys for the model's language model (built-in or Hugging Face) and its template.
    add_bos: the template starts with the BOS text, which llama.cpp strips and adds back as a token."""
    spec, pre, add_bos, template = (builtin_tokenizer if model.lm.source is None else hf_tokenizer)(tok)
    tokens, types, merges = bpe_tables(spec, n_vocab, set(SPECIALS) if model.lm.source is None else set())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)           # the end of an answer (an end-of-turn token for HF templates)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)
