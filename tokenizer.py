"""Byte-level BPE tokenizer and the one chat template used by training and generation.

Any text encodes (bytes are the base alphabet), so Chinese, English and emoji prompts all work.
Merges never glue a CJK character (or full-width punctuation) to a neighbour, except into a word
the caller declares: without words "红色的三角形" is six tokens; the demo declares its colour, shape
and position names and fixed phrases, and it is the three tokens 红色 / 的 / 三角形. Either way a
colour and a shape never share a token, so the model can put together a pair it never saw side by
side. Training splits CJK characters off one by one; the trained tokenizer then splits text with
GPT-2's pre-tokenizer alone (what llama.cpp's "gpt-2" pre-tokenizer does, so a GGUF export
tokenizes exactly as we do), keeps no trained merge that joins a CJK character to a neighbour, and
gets one merge of whole characters per step of each declared word, ranked after all the others.

Template (one or more turns):
    <s><|user|>{<image> x N}{question}<|assistant|>{answer}</s><|user|>...
Loss is taken on the answer tokens and their </s> only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

IMAGE, PAD, BOS, EOS, USER, ASSISTANT = "<image>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIALS = [IMAGE, PAD, BOS, EOS, USER, ASSISTANT]          # ids 0..5 in this order
WORDS_FILE = "words.txt"    # in a local data folder: words Tokenizer.train makes one token each, one per line
CJK_RANGES = ((0x2E80, 0x2FFF), (0x3000, 0x303F), (0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
              (0xF900, 0xFAFF), (0xFF00, 0xFFEF))
CJK = "[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in CJK_RANGES) + "]"


class Tokenizer:
    system_turns = False                # the template has no place for a system message

    # encodings kept: the demo's 7 epochs and validation hold ~4100 distinct texts of at most 47
    # characters (137 in English); a server's tokenizer sees any text and keeps no more than this
    KNOWN_TEXTS, KNOWN_CHARS = 1 << 13, 200

    def __init__(self, tok: HFTokenizer):
        self.tok, self.known = tok, {}
        self.tok.encode_special_tokens = True     # user text can never smuggle in "<image>" or "</s>"
        ids = [tok.token_to_id(s) for s in SPECIALS]
        if None in ids:
            raise ValueError("tokenizer lacks the special tokens " + ", ".join(SPECIALS))
        self.image_id, self.pad_id, self.bos_id, self.eos_id, self.user_id, self.assistant_id = ids

    @classmethod
    def train(cls, texts, vocab_size: int = 1024, words=()) -> "Tokenizer":
        """words: CJK words that may each become one token (a language's fixed vocabulary, such as
        the demo's colour, shape and position names); every other CJK character stays a token."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        spec = json.loads(tok.to_str())
        spec["model"]["merges"] = [m for m in spec["model"]["merges"] if not joins_cjk(*map(token_bytes, m))]
        add_words(spec["model"], words)
        return cls(HFTokenizer.from_str(json.dumps(spec, ensure_ascii=False)))

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(s))

    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of plain text. Short training texts repeat every epoch, so their encodings are kept
        (KNOWN_TEXTS of at most KNOWN_CHARS characters): a tenth of the demo's data time."""
        ids = self.known.get(text)
        if ids is None:
            ids = tuple(self.tok.encode(text, add_special_tokens=False).ids)
            if len(text) <= self.KNOWN_CHARS and len(self.known) < self.KNOWN_TEXTS:
                self.known[text] = ids
        return list(ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def show(self, ids) -> str:
        """The text of ids with the template's special tokens written out (for --check-data)."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_chat(self, messages, image_tokens: int = 0, n_images: int = 0,
                    add_generation_prompt: bool = False):
        """messages: [{"role": "user"|"assistant", "content": str}, ...]. Each "<image>" in a
        user message becomes image_tokens copies of the image id; with images but no marker the
        image goes in front of the first user message. The template has no place for a system
        message: "system" turns are left out. Returns (ids, labels) where labels copy the ids of
        assistant answers (and their </s>) and are -100 elsewhere."""
        marked = sum(m["content"].count(IMAGE) for m in messages if m["role"] == "user")
        if marked not in (0, n_images):
            raise ValueError(f"{marked} <image> markers in the prompt but {n_images} image(s)")
        ids, labels = [self.bos_id], [-100]
        first_user = True
        for m in messages:
            if m["role"] == "user":
                text = m["content"]
                if first_user and n_images and not marked:
                    text = IMAGE * n_images + text
                text = images_first(text)
                first_user = False
                part = [self.user_id]
                for i, piece in enumerate(text.split(IMAGE)):
                    if i:
                        part += [self.image_id] * image_tokens
                    part += self.encode(piece)
                ids += part
                labels += [-100] * len(part)
            elif m["role"] == "assistant":
                answer = self.encode(m["content"]) + [self.eos_id]
                ids += [self.assistant_id] + answer
                labels += [-100] + answer
            elif m["role"] != "system":
                raise ValueError(f"unknown role {m['role']!r}")
        if add_generation_prompt:
            ids.append(self.assistant_id)
            labels.append(-100)
        return ids, labels


def _gpt2_bytes() -> dict:
    """GPT-2's byte -> printable character table, inverted: the characters BPE tokens are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip([*printable, *range(256, 256 + len(rest))], [*printable, *rest])}


_BYTE_OF = _gpt2_bytes()


def token_bytes(token: str) -> bytes:
    """A BPE token (written in GPT-2's byte characters) as the bytes it stands for."""
    return bytes(_BYTE_OF[c] for c in token)


def maybe_cjk(char: bytes) -> bool:
    """Whether these bytes (one UTF-8 character, or the part of it a token holds) can be a CJK
    character: the code points they may stand for overlap the CJK ranges."""
    if 0x80 <= char[0] < 0xC0:                  # no lead byte here: it could be any character
        return True
    n = 1 if char[0] < 0x80 else 2 if char[0] < 0xE0 else 3 if char[0] < 0xF0 else 4
    lo = hi = char[0] & (0xFF >> (n + 1)) if n > 1 else char[0]
    for i in range(1, n):                       # continuation bytes the piece lacks: any value
        c = char[i] & 0x3F if i < len(char) else None
        lo, hi = lo << 6 | (c or 0), hi << 6 | (0x3F if c is None else c)
    return any(a <= hi and lo <= b for a, b in CJK_RANGES)


def add_words(bpe: dict, words):
    """Give each word one token: merges of its whole characters, left to right, after every other
    merge (a word with a character the vocabulary lacks as one token is left out)."""
    vocab, merges = bpe["vocab"], bpe["merges"]
    gpt2 = {b: c for c, b in _BYTE_OF.items()}
    for w in words:
        chars = ["".join(gpt2[b] for b in ch.encode()) for ch in w]
        if len(chars) < 2 or not all(c in vocab for c in chars):
            continue
        piece = chars[0]
        for c in chars[1:]:
            if piece + c not in vocab:
                merges.append([piece, c])
                vocab[piece + c] = len(vocab)
            piece += c


def joins_cjk(left: bytes, right: bytes) -> bool:
    """Whether merging these two pieces joins a CJK character to a neighbour: the cut falls between
    two characters and the one on either side is, or may be, CJK."""
    if 0x80 <= right[0] < 0xC0:                 # the cut is inside one character
        return False
    start = max((i for i, b in enumerate(left) if not 0x80 <= b < 0xC0), default=0)
    lead = right[0]
    width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return maybe_cjk(left[start:]) or maybe_cjk(right[:width])


def kept_length(ids, labels, image_id: int, max_len: int) -> int | None:
    """How many tokens of an encoded training sample fit a context of max_len: all of them, or
    max_len when only answer text after the last image token is cut and at least one supervised
    token stays; None when the cut would fall inside (or before the end of) the image tokens or
    when nothing (within max_len) is supervised: such a sample cannot be trained on."""
    if all(l == -100 for l in labels[:max_len]):
        return None
    if len(ids) <= max_len:
        return len(ids)
    last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    if last_image >= max_len:
        return None
    return max_len


def images_first(text: str) -> str:
    """Where a user turn's images go in the built-in template. Images come before the turn's words,
    as in every training prompt: "描述这张图片<image>" (how most OpenAI clients order parts) encodes
    exactly like "<image>描述这张图片", so the answer cannot depend on where the client put the image.
    Several images are each named in front ("图1：<image>图2：<image>哪张…", as multi-image models
    are prompted): a small language model cannot tell which of two runs of image tokens came first,
    but it can read a name. Words between two images already name them: such a turn keeps its order."""
    k = text.count(IMAGE)
    parts = [p.strip() for p in text.split(IMAGE)]
    if any(parts[1:-1]):
        return text
    words = text[len(IMAGE * k):] if text.startswith(IMAGE * k) else " ".join(p for p in parts if p)
    return (IMAGE if k == 1 else "".join(f"{PICTURE.format(i + 1)}{IMAGE}" for i in range(k))) + words


PICTURE = "图{}："            # the name in front of each of several images in a turn


class ChatTemplateTokenizer:
    """A Hugging Face tokenizer with its own chat template, behind the same interface as
    Tokenizer (encode/decode/encode_chat, image/pad/bos/eos ids, to_str), so Collator, generate
    and serve work unchanged with an existing LLM. `<image>` must already be one of its tokens.

    encode_chat renders the template turn by turn: the text a turn adds after the generation
    prompt is the answer; its tokens up to and including the end-of-turn token carry the loss,
    whatever the template writes after that token (ChatML's newline) does not."""

    system_turns = True                 # the model's own template renders system messages

    def __init__(self, hf):
        self.hf = hf
        hf.chat_template = with_content_lists(hf.chat_template or FALLBACK_TEMPLATE)
        self.image_id = hf.convert_tokens_to_ids(IMAGE)
        if self.image_id is None or self.image_id == hf.unk_token_id:
            raise ValueError(f"tokenizer lacks the {IMAGE} token")
        self.eos_id = self._end_of_turn_id()
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        self.bos_id = hf.bos_token_id if hf.bos_token_id is not None else self.pad_id

    def _render(self, messages, add_generation_prompt):
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_of_turn_id(self) -> int:
        """The token the template puts right after an answer (e.g. <|im_end|>), else eos."""
        chat = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        prompt, full = self._render(chat[:1], True), self._render(chat, False)
        after = full[len(prompt):].split("2", 1)[-1]
        special = set(self.hf.all_special_ids) | {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        ids = [i for i in self.encode(after) if i in special]
        if ids:
            return ids[0]
        if self.hf.eos_token_id is None:
            raise ValueError("tokenizer has neither an end-of-turn token in its chat template nor an eos token")
        return self.hf.eos_token_id

    @classmethod
    def from_str(cls, s: str) -> "ChatTemplateTokenizer":
        """Rebuild from to_str(): the tokenizer's saved files, written to a temp folder."""
        import tempfile
        from transformers import AutoTokenizer
        with tempfile.TemporaryDirectory() as d:
            for name, text in json.loads(s)["hf_tokenizer_files"].items():
                (Path(d) / name).write_text(text, encoding="utf-8")
            return cls(AutoTokenizer.from_pretrained(d))

    def to_str(self) -> str:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            self.hf.save_pretrained(d)
            files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(d).iterdir()) if p.is_file()}
        return json.dumps({"hf_tokenizer_files": files}, ensure_ascii=False)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def show(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_chat(self, messages, image_tokens: int = 0, n_images: int = 0,
                    add_generation_prompt: bool = False):
        """Same contract as Tokenizer.encode_chat: (ids, labels), labels -100 outside answers."""
        marked = sum(m["content"].count(IMAGE) for m in messages if m["role"] == "user")
        if marked not in (0, n_images):
            raise ValueError(f"{marked} <image> markers in the prompt but {n_images} image(s)")
        if n_images and not marked:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = [*messages[:first], {**messages[first], "content": IMAGE * n_images + messages[first]["content"]},
                        *messages[first + 1:]]
        ids, labels, done = [], [], ""

        def add(text, supervised):
            piece = self.encode(text)
            end = piece.index(self.eos_id) + 1 if supervised and self.eos_id in piece else len(piece)
            ids.extend(piece)
            labels.extend(piece[:end] + [-100] * (len(piece) - end) if supervised else [-100] * len(piece))

        for i, m in enumerate(messages):
            if m["role"] not in ("user", "assistant", "system"):
                raise ValueError(f"unknown role {m['role']!r}")
            if m["role"] == "assistant":
                prompt, full = self._render(messages[:i], True), self._render(messages[:i + 1], False)
                if not (prompt.startswith(done) and full.startswith(prompt)):
                    raise ValueError("the chat template does not render turns as prefixes of each other")
                add(prompt[len(done):], False)
                add(full[len(prompt):], True)
                done = full
        rest = self._render(messages, add_generation_prompt)
        if not rest.startswith(done):
            raise ValueError("the chat template does not render turns as prefixes of each other")
        add(rest[len(done):], False)
        out_ids, out_labels = [], []
        for t, l in zip(ids, labels):                 # each <image> becomes image_tokens copies
            n = image_tokens if t == self.image_id else 1
            out_ids += [t] * n
            out_labels += [l if t != self.image_id else -100] * n
        return out_ids, out_labels


# Put in front of a chat template so it also reads OpenAI/transformers-style content lists:
# {"type": "image"} (or "image_url") parts become <image>, text parts their text, joined in order
# (how server/protocol.py turns an OpenAI message into a turn). String contents pass unchanged, so
# a template behind this prelude renders every string conversation exactly as before; exported
# processors and vLLM then render [{"type": "image"}, {"type": "text", ...}] as we trained.
CONTENT_LISTS = (
    "{#- content lists -#}{%- set _mm = namespace(out=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}{%- set _mm.out = _mm.out + [m] -%}"
    "{%- else -%}{%- set _t = namespace(s='') -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set _t.s = _t.s + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _t.s = _t.s + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set _mm.out = _mm.out + [{'role': m['role'], 'content': _t.s}] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = _mm.out -%}")


def with_content_lists(template: str) -> str:
    """The template behind the CONTENT_LISTS prelude (once)."""
    return template if template.startswith(CONTENT_LISTS) else CONTENT_LISTS + template


# For base models that ship without a chat template.
FALLBACK_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
    "{{ eos_token }}\n{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def load_tokenizer(s: str):
    """Either kind of tokenizer from its to_str() form (as stored in checkpoints)."""
    if s.startswith('{"hf_tokenizer_files"'):
        return ChatTemplateTokenizer.from_str(s)
    return Tokenizer.from_str(s)
