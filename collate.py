"""From samples to tensors: image tensors (images.py), chat tokenisation and padding.

A sample is {"image": PIL.Image | None, "messages": [...], ...extra tensors}. Training batches
are right-padded (loss masks hide the pad); generation batches are left-padded with an
attention mask so every row's last token sits at the same column.
"""
from __future__ import annotations

import torch

from images import to_tensor
from model import VLMConfig
from tokenizer import Tokenizer


class Collator:
    """Callable for DataLoader(collate_fn=...). train=True: prompt + answer, right padding,
    labels. train=False: prompt + assistant marker, left padding, for generate()."""

    def __init__(self, tokenizer: Tokenizer, cfg: VLMConfig, train: bool = True,
                 max_len: int | None = None):
        self.tok, self.cfg, self.train = tokenizer, cfg, train
        self.max_len = max_len or cfg.lm_max_len

    def encode(self, sample):
        n_images = 0 if sample.get("image") is None else 1
        messages = sample["messages"]
        if not self.train and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, labels = self.tok.encode_chat(messages, self.cfg.image_tokens, n_images,
                                           add_generation_prompt=not self.train)
        if len(ids) > self.max_len:
            first_label = next((i for i, l in enumerate(labels) if l != -100), len(ids))
            if not self.train or first_label >= self.max_len:
                # never cut into the prompt or the image tokens: the splice would no longer match
                raise ValueError(f"prompt too long: {len(ids)} tokens > limit {self.max_len}")
            ids, labels = ids[:self.max_len], labels[:self.max_len]   # shorten the answer only
        return ids, labels

    def __call__(self, samples):
        encoded = [self.encode(s) for s in samples]
        T = max(len(ids) for ids, _ in encoded)
        B = len(samples)
        input_ids = torch.full((B, T), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, (ids, lab) in enumerate(encoded):
            sl = slice(0, len(ids)) if self.train else slice(T - len(ids), T)
            input_ids[b, sl] = torch.tensor(ids)
            labels[b, sl] = torch.tensor(lab)
            attention_mask[b, sl] = 1
        images = [to_tensor(s["image"], self.cfg)
                  for s in samples if s.get("image") is not None]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "pixels": torch.stack(images) if images else None}
        if self.train:
            batch["labels"] = labels
        for key in samples[0]:
            if key not in ("image", "messages") and isinstance(samples[0][key], torch.Tensor):
                batch[key] = torch.stack([s[key] for s in samples])
        return batch
