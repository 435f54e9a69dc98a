"""From samples to tensors: image tensors (images.py), chat tokenisation and padding.

A sample is {"images": [PIL.Image, ...], "messages": [...], ...extra tensors}, with one `<image>`
marker per image in its user turns (or none: the images then go in front of the first user turn);
the older {"image": PIL.Image | None} form means a list of one or none. Training batches are
right-padded (loss masks hide the pad); generation batches are left-padded with an attention
mask so every row's last token sits at the same column. A batch's pixels are every image of
every sample, in sample order and then image order: the order of the `<image>` runs in the
flattened batch, which is how VLM.embed splices them. They stay uint8 (images.to_tensor):
VLM.embed normalises them on the device.
"""
from __future__ import annotations

import torch

from images import to_tensor
from layout import image_positions, loss_targets
from model import VLMConfig
from tokenizer import Tokenizer, kept_length


class Collator:
    """Callable for DataLoader(collate_fn=...). train=True: prompt + answer, right padding,
    labels. train=False: prompt + assistant marker, left padding, for generate()."""

    def __init__(self, tokenizer: Tokenizer, cfg: VLMConfig, train: bool = True,
                 max_len: int | None = None):
        self.tok, self.cfg, self.train = tokenizer, cfg, train
        self.max_len = max_len or cfg.lm_max_len

    def encode(self, sample):
        messages = sample["messages"]
        if not self.train and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, labels = self.tok.encode_chat(messages, self.cfg.image_tokens, len(images_of(sample)),
                                           add_generation_prompt=not self.train)
        if len(ids) > self.max_len:
            # only answer text after the last image may go (the splice needs every image token)
            keep = kept_length(ids, labels, self.cfg.image_token_id, self.max_len) if self.train else None
            if keep is None:
                raise ValueError(f"prompt too long: {len(ids)} tokens > limit {self.max_len}")
            ids, labels = ids[:keep], labels[:keep]
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
        images = [to_tensor(img, self.cfg) for s in samples for img in images_of(s)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "pixels": torch.stack(images) if images else None}
        if self.train:      # the splice's and the loss's positions, worked out here on the CPU (layout.py)
            batch["labels"], batch["targets"] = labels, loss_targets(labels)
            batch["image_pos"] = image_positions(input_ids, len(images), self.cfg.image_token_id, self.cfg.image_tokens)
        for key in samples[0]:
            if key not in ("image", "images", "messages") and isinstance(samples[0][key], torch.Tensor):
                batch[key] = torch.stack([s[key] for s in samples])
        return batch


def images_of(sample) -> list:
    """A sample's images in order: its "images" list, else its one "image" (or none)."""
    if "images" in sample:
        return list(sample["images"])
    return [] if sample.get("image") is None else [sample["image"]]
