"""Where a batch's image features splice in and which positions its loss is taken at, worked out
from the token ids alone; and a padded batch's positions and attention mask.

The collator computes both on the CPU beside the padding, so the training step on the device has
no shape that depends on the data: nothing in it waits for the host (no .item(), no nonzero()),
and torch.compile traces forward and backward as one graph. VLM works them out itself when a
caller passes none (generation, scoring a batch built by hand), at the price of that wait.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Targets(NamedTuple):
    """The loss's positions: the last decoder block produces columns start.. only, and the logits
    are taken at `index`, rows of those hidden states flattened to (B * (T - start), D)."""
    start: int                  # first column whose next token is supervised
    index: torch.Tensor         # (n,) long
    target: torch.Tensor        # (n,) the next tokens there

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets(self.start, self.index.to(device, non_blocking=non_blocking),
                       self.target.to(device, non_blocking=non_blocking))


def image_positions(input_ids, n_images: int, image_token_id: int, image_tokens: int) -> torch.Tensor:
    """Flat positions in (B * T) of the `<image>` tokens, in reading order: the order the images'
    patch features fill them in (VLM.embed). Each image must have exactly `image_tokens` of them."""
    pos = (input_ids == image_token_id).flatten().nonzero().squeeze(1)
    if len(pos) != n_images * image_tokens:
        raise ValueError(
            f"image tokens and images do not match: the prompts hold {len(pos)} <image> "
            f"tokens but {n_images} image(s) give {n_images * image_tokens} "
            f"({image_tokens} per image)")
    return pos


def loss_targets(labels) -> Targets:
    """labels (B, T), -100 where no loss is taken -> Targets."""
    target = labels[:, 1:]                              # position p predicts token p + 1
    keep = target != -100
    cols = keep.any(0).nonzero()
    start = int(cols[0]) if len(cols) else 0
    rows, col = keep[:, start:].nonzero(as_tuple=True)
    return Targets(start, rows * (labels.shape[1] - start) + col, target[:, start:][keep[:, start:]])


def positions_and_mask(attention_mask, shape):
    """Positions count only real tokens (left padding shifts them); the mask is causal and
    hides pad keys. With no padding, mask is None and SDPA's fast causal path is used."""
    B, T = shape
    if attention_mask is None or bool(attention_mask.all()):
        dev = None if attention_mask is None else attention_mask.device
        return torch.arange(T, device=dev).expand(B, T), None
    am = attention_mask.bool()
    positions = (am.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=am.device).tril()
    mask = causal & am[:, None, None, :]                   # (B, 1, T, T)
    mask |= torch.eye(T, dtype=torch.bool, device=am.device)  # pad rows attend to themselves (no NaN)
    return positions, mask
