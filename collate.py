"""From samples to tensors: image tensors (images.py), chat tokenisation and padding.

A sample is {"images": [PIL.Image, ...], "messages": [...], ...extra tensors}, with one `<image>`
marker per image in its user turns (or none: the images then go in front of the first user turn);
the older {"image": PIL.Image | None} form means a list of one or none. {"hide": p}, alike in all
of a data set's items, feeds each answer token to the model as <pad> with probability p while the
targets stay the true text: the next word must then come from the image, not from the words before
it (scenes.SceneDataset). Training batches are right-padded (loss masks hide the pad), or packed:
several samples to a row, each attending to itself alone; generation batches are left-padded
with an attention mask so every row's last token sits at the same column. A batch's pixels are
every image of every sample, in the order the samples stand row by row and then image order: the
order of the `<image>` runs in the flattened batch, which is how VLM.embed splices them (per-sample
extra tensors follow the same order). They stay uint8 (images.to_tensor): VLM.embed normalises
them on the device.
"""
from __future__ import annotations

import zlib

import torch

from images import to_tensor
from layout import image_positions, loss_targets, positions_and_mask
from model import VLMConfig
from tokenizer import Tokenizer, kept_length


class Collator:
    """Callable for DataLoader(collate_fn=...). train=True: prompt + answer, right padding,
    labels. train=False: prompt + assistant marker, left padding, for generate(). pack (training
    only, for a language model that declares `packs`): several samples share a row (pack())."""

    def __init__(self, tokenizer: Tokenizer, cfg: VLMConfig, train: bool = True,
                 max_len: int | None = None, pack: bool = False):
        self.tok, self.cfg, self.train, self.pack = tokenizer, cfg, train, pack and train
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
        rows = pack([len(ids) for ids, _ in encoded], T) if self.pack else [[i] for i in range(len(samples))]
        B = len(rows)
        input_ids = torch.full((B, T), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)      # 0: pad, k: the row's k-th sample
        for b, row in enumerate(rows):
            col = 0 if self.train else T - len(encoded[row[0]][0])
            for k, i in enumerate(row, 1):
                ids, lab = encoded[i]
                sl = slice(col, col + len(ids))
                input_ids[b, sl], labels[b, sl], attention_mask[b, sl] = torch.tensor(ids), torch.tensor(lab), k
                col += len(ids)
        hide = samples[0].get("hide", 0.0) if self.train else 0.0
        if hide:            # which tokens: a function of the batch, so a resumed run or another rank replays it
            g = torch.Generator().manual_seed(zlib.crc32(input_ids.numpy().tobytes()))
            input_ids = input_ids.masked_fill((labels != -100) & (torch.rand(B, T, generator=g) < hide), self.tok.pad_id)
        samples = [samples[i] for row in rows for i in row]          # reading order: the splice's, the extras'
        images = [to_tensor(img, self.cfg) for s in samples for img in images_of(s)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "samples": len(samples),
                 "pixels": torch.stack(images) if images else None}
        if self.train:      # the splice's, the loss's and attention's layout, worked out here on the CPU (layout.py)
            batch["labels"], batch["targets"] = labels, loss_targets(labels)
            batch["image_pos"] = image_positions(input_ids, len(images), self.cfg.image_token_id, self.cfg.image_tokens)
            packed = B < len(samples)          # else right padding needs no mask: causal attention ignores it
            batch["attention"] = positions_and_mask(attention_mask if packed else None, (B, T))
        for key in samples[0]:
            if key not in ("image", "images", "messages") and isinstance(samples[0][key], torch.Tensor):
                batch[key] = torch.stack([s[key] for s in samples])
        return batch


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Samples (indices into `lengths`) into rows of at most `capacity` tokens: first fit, longest
    first. A padded batch's rows are about half padding when lengths vary; packed, the same
    samples take fewer rows, and each still sees only itself (layout.positions_and_mask)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def images_of(sample) -> list:
    """A sample's images in order: its "images" list, else its one "image" (or none)."""
    if "images" in sample:
        return list(sample["images"])
    return [] if sample.get("image") is None else [sample["image"]]
