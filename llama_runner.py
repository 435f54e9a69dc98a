"""Greedy answers from llama.cpp for a GGUF export, to compare with ours token for token
(tests/test_gguf.py, bench/bench_gguf.py).

llama-cpp-python's bindings drive libllama and libmtmd the way llama-server does: the GGUF's own
chat template renders the conversation (content parts flattened as llama.cpp flattens them, images
as its media marker), llama.cpp strips the template's leading BOS and adds it back, libmtmd splits
the prompt at the markers, encodes each image with the mmproj and evaluates text and image chunks;
then every step takes the most likely token until an end-of-generation token. Dev requirement.
"""
from __future__ import annotations

import ctypes
import io
import time

import numpy as np


def flatten(content, marker: str) -> str:
    """A message's content as llama.cpp hands it to the template when it has media: image parts
    become the marker, text parts their text, a newline between two text parts in a row."""
    if isinstance(content, str):
        return content
    text, after_text = "", False
    for part in content:
        if part["type"] == "text":
            text += ("\n" if after_text else "") + part["text"]
            after_text = True
        else:
            text += marker
            after_text = False
    return text


class LlamaCpp:
    def __init__(self, model_path, mmproj_path, threads: int = 1):
        import jinja2.sandbox
        import llama_cpp
        from llama_cpp import mtmd_cpp
        self.lib, self.mtmd = llama_cpp, mtmd_cpp
        self.llm = llama_cpp.Llama(str(model_path), n_ctx=0, n_batch=4096, n_threads=threads,   # n_ctx 0: the model's
                                   n_threads_batch=threads, verbose=False)
        from llama_cpp._logger import llama_log_callback      # llama.cpp's lines only when verbose (errors)
        for set_log in (mtmd_cpp.mtmd_log_set, mtmd_cpp.mtmd_helper_log_set):
            set_log(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, threads, False, False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {mmproj_path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self.template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(
            self.llm.metadata["tokenizer.chat_template"])

    def close(self):
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def render(self, messages) -> str:
        piece = lambda i: self.llm.detokenize([i], special=True).decode()
        text = self.template.render(messages=[{**m, "content": flatten(m["content"], self.marker)} for m in messages],
                                    bos_token=piece(self.llm.token_bos()), eos_token=piece(self.llm.token_eos()),
                                    add_generation_prompt=True)
        return text.removeprefix(piece(self.llm.token_bos()))    # llama.cpp adds BOS itself (add_bos_token)

    def _chunks(self, messages, images):
        """libmtmd's chunks for the prompt (the caller frees them)."""
        m = self.mtmd
        bitmaps = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data = buf.getvalue()
            bitmaps.append(m.mtmd_helper_bitmap_init_from_buf(self.ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data),
                                                              len(data), False))
        text = self.render(messages).encode()
        inp = m.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
        chunks = m.mtmd_input_chunks_init()
        array = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        status = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
        for b in bitmaps:
            m.mtmd_bitmap_free(b)
        if status != 0:
            m.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({status}): images and markers do not match?")
        return chunks

    def prompt_ids(self, messages, images, image_id: int) -> list[int]:
        """The prompt as token ids, each image's positions written as image_id (our layout)."""
        m, ids = self.mtmd, []
        chunks = self._chunks(messages, images)
        try:
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids += [tokens[j] for j in range(n.value)]
                else:
                    ids += [image_id] * m.mtmd_input_chunk_get_n_tokens(chunk)
        finally:
            m.mtmd_input_chunks_free(chunks)
        return ids

    def greedy(self, messages, images, max_new_tokens: int = 64) -> tuple[list[int], dict]:
        """(answer token ids without the end token, {"prefill_s", "decode_s"})."""
        lib, m = self.lib, self.mtmd
        chunks = self._chunks(messages, images)
        lib.llama_memory_clear(lib.llama_get_memory(self.llm.ctx), True)
        n_past = lib.llama_pos(0)
        t0 = time.perf_counter()
        try:
            if m.mtmd_helper_eval_chunks(self.ctx, self.llm.ctx, chunks, 0, 0, self.llm.n_batch, True,
                                         ctypes.byref(n_past)) != 0:
                raise RuntimeError("llama.cpp could not evaluate the prompt")
        finally:
            m.mtmd_input_chunks_free(chunks)
        t1 = time.perf_counter()
        out = []
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
            token = int(logits.argmax())
            if lib.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) == max_new_tokens:
                break
            if lib.llama_decode(self.llm.ctx, lib.llama_batch_get_one((lib.llama_token * 1)(token), 1)) != 0:
                raise RuntimeError("llama_decode failed")
        return out, {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}


def ours(model, tok, messages, images, max_new_tokens: int = 64) -> list[int]:
    """Our greedy answer's token ids (without the end token), decoded as evaluate.py does."""
    import torch

    from collate import Collator
    from tokenizer import IMAGE
    plain = [{**m, "content": flatten(m["content"], IMAGE)} for m in messages]
    batch = Collator(tok, model.cfg, train=False)([{"images": images, "messages": plain}])
    with torch.inference_mode():
        cols = list(model.generate(batch["input_ids"], batch["pixels"], batch["attention_mask"],
                                   max_new_tokens=max_new_tokens))
    out = [int(c[0]) for c in cols]
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out
