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
    """The loss's positions: the last decoder block produces only the columns `queries` (B, Tq) of
    each row (its supervised columns, left-aligned; a row with fewer repeats unsupervised ones), and
    the logits are taken at `index`, rows of those hidden states flattened to (B * Tq, D)."""
    queries: torch.Tensor       # (B, Tq) long: columns whose next token is supervised
    index: torch.Tensor         # (n,) long
    target: torch.Tensor        # (n,) the next tokens there

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets(*(t.to(device, non_blocking=non_blocking) for t in self))


def at_columns(t: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """t (B, T, ...) at each row's columns `queries` (B, Tq): (B, Tq, ...); all of t if queries is None."""
    if queries is None:
        return t
    return t.gather(1, queries.view(*queries.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


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
    n = keep.sum(1, keepdim=True)
    queries = keep.int().argsort(dim=1, descending=True, stable=True)[:, :max(1, int(n.max()))]   # supervised first
    taken = torch.arange(queries.shape[1], device=labels.device) < n         # (B, Tq): the slots that are supervised
    return Targets(queries, taken.flatten().nonzero().squeeze(1), target.gather(1, queries)[taken])


class Attention(NamedTuple):
    """Who attends to whom: positions (B, T) for RoPE, and mask (B, 1, T, T) bool or None for
    plain causal attention."""
    positions: torch.Tensor
    mask: torch.Tensor | None

    def to(self, device, non_blocking: bool = False) -> "Attention":
        return Attention(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))


def positions_and_mask(attention_mask, shape) -> Attention:
    """attention_mask (B, T): 0 for padding, else the number of the sample a token belongs to: 1
    in an ordinary row, 1, 2, ... in a packed one (collate.pack). Positions count from each
    sample's first token (left padding shifts them); the mask is causal within a sample and hides
    pad keys (a pad query sees every real key before it: a right-padded row's last query row is
    the row's key mask, backbones.HFLanguageModel). One sample per row and no padding: mask is
    None and SDPA's fast causal path is used."""
    B, T = shape
    if attention_mask is None or bool((attention_mask == 1).all()):
        dev = None if attention_mask is None else attention_mask.device
        # a tensor of its own, not an expanded view: a DataLoader pins the collator's batches for
        # a GPU, and pinning copies into a tensor of the same strides, which must not overlap
        return Attention(torch.arange(T, device=dev).repeat(B, 1), None)
    am = attention_mask
    col = torch.arange(T, device=am.device).expand(B, T)
    first = torch.cat([torch.ones_like(am[:, :1], dtype=torch.bool), am[:, 1:] != am[:, :-1]], 1)
    start = torch.where(first, col, 0).cummax(1).values               # where each token's sample began
    positions = torch.where(am > 0, col - start, 0)
    causal = torch.ones(T, T, dtype=torch.bool, device=am.device).tril()
    mask = causal & ((am[:, :, None] == am[:, None, :]) | (am[:, :, None] == 0)) & (am[:, None, :] > 0)
    mask |= torch.eye(T, dtype=torch.bool, device=am.device)  # pad rows attend to themselves (no NaN)
    return Attention(positions, mask[:, None])
