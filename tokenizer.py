"""Byte-level BPE tokenizer and the one chat template used by training and generation.

Any text encodes (bytes are the base alphabet), so Chinese, English and emoji prompts all work.
CJK characters and full-width punctuation are split off one by one before BPE, so merges never
glue two Chinese characters together: "红色的三角形" stays six tokens, which lets the model put
a colour and a shape together that it never saw side by side.

Template (one or more turns):
    <s><|user|>{<image> x N}{question}<|assistant|>{answer}</s><|user|>...
Loss is taken on the answer tokens and their </s> only.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

IMAGE, PAD, BOS, EOS, USER, ASSISTANT = "<image>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIALS = [IMAGE, PAD, BOS, EOS, USER, ASSISTANT]          # ids 0..5 in this order
CJK = r"[\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.tok.encode_special_tokens = True     # user text can never smuggle in "<image>" or "</s>"
        ids = [tok.token_to_id(s) for s in SPECIALS]
        if None in ids:
            raise ValueError("tokenizer lacks the special tokens " + ", ".join(SPECIALS))
        self.image_id, self.pad_id, self.bos_id, self.eos_id, self.user_id, self.assistant_id = ids

    @classmethod
    def train(cls, texts, vocab_size: int = 1024) -> "Tokenizer":
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
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(s))

    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_chat(self, messages, image_tokens: int = 0, n_images: int = 0,
                    add_generation_prompt: bool = False):
        """messages: [{"role": "user"|"assistant", "content": str}, ...]. Each "<image>" in a
        user message becomes image_tokens copies of the image id; with images but no marker the
        image goes in front of the first user message. Returns (ids, labels) where labels copy
        the ids of assistant answers (and their </s>) and are -100 elsewhere."""
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
            else:
                raise ValueError(f"unknown role {m['role']!r}")
        if add_generation_prompt:
            ids.append(self.assistant_id)
            labels.append(-100)
        return ids, labels
