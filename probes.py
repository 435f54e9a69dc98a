"""Auxiliary targets that teach a vision encoder trained from scratch to see (training only: a
probe reads the encoder's patch features through a forward hook, so the model's code stays
untouched, and it is not saved with the model).

A ViT started from random weights learns to see slowly from the language loss alone: the language
model first learns what answers usually say and ignores the image for a long while.
PixelProbe (any pictures, train_vision_real.py): from each patch's output feature, predict that
patch's own pixels at low resolution (an autoencoder target that needs no labels), so from the
first steps the features carry the colours and outlines of what lies in each patch.
CellProbe (the synthetic scenes, train_vision.py): the sharper targets the scenes know -- the shape
and colour in each cell, where each patch lies, and each patch's colour-blind silhouette.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from images import normalise
from scenes import COLOURS, IGNORE, SHAPES

OUTLINE_SIDE = 8               # CellProbe's silhouette of a patch: 8x8 values (docs/training.md)


class PixelProbe(torch.nn.Module):
    def __init__(self, vision: torch.nn.Module, cfg, side: int = 8):
        super().__init__()
        self.cfg, self.grid, self.side = cfg, cfg.vit_image_size // cfg.vit_patch_size, side
        self.head = torch.nn.Linear(cfg.vit_dim, 3 * side * side)
        self.feats = None
        vision.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.feats = output if module.training else None

    def targets(self, pixels):
        """(M, 3, H, W) -> (M, grid², 3·side²): each patch's normalised pixels pooled to side×side."""
        return per_patch(normalise(pixels, self.cfg), self.grid, self.side)

    def forward(self, batch):
        feats, self.feats = self.feats, None
        if feats is None or batch.get("pixels") is None:     # a batch of text-only samples
            return self.head.weight.sum() * 0.0
        return F.mse_loss(self.head(feats.float()), self.targets(batch["pixels"]))


def per_patch(x, grid: int, side: int):
    """(M, C, H, W) -> (M, grid², C·side²): each of the grid×grid patches pooled to side×side, row-major."""
    small = F.adaptive_avg_pool2d(x, grid * side)                                      # (M, C, g·s, g·s)
    return small.reshape(-1, x.shape[1], grid, side, grid, side).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


def silhouettes(pixels, full: float = 0.3):
    """uint8 (M, 3, H, W) pictures on a plain background -> (M, 1, H, W) in [0, 1]: each pixel's RGB
    distance from the background colour, reaching 1 at `full` (0-1 units). The background is each
    channel's median along the picture's border, which shapes barely touch (the same colour as the
    whole picture's median on the demo's scenes, and far cheaper to find). Colour-blind: a
    yellow and a blue cross have one silhouette, and so has a picture with its channels swapped
    (a permutation keeps distances)."""
    x = pixels.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], -1)   # (M, 3, 4S - 4)
    background = border.median(-1).values[..., None, None]
    return (x - background).square_().sum(1, keepdim=True).sqrt_().div_(full * 255).clamp_(max=1)


def for_model(model) -> PixelProbe | None:
    """A PixelProbe when the model's vision encoder is the built-in ViT (no pretrained source) and
    it trains; pretrained towers already see, and a frozen encoder cannot learn from it."""
    vision, cfg = model.vision, model.cfg
    if vision.source is not None or not any(p.requires_grad for p in vision.parameters()):
        return None
    return PixelProbe(vision, cfg)


class CellProbe(torch.nn.Module):
    """Auxiliary training signal for the vision encoder (about 17 thousand parameters, not saved
    with the model). From the encoder's patch features it predicts, for each 3x3 cell, the shape
    and colour there (features pooled per cell), and for each patch, which cell it lies in and
    its colour-blind silhouette (silhouettes above, 8x8 per patch: one head for every
    colour, so shape features learnt on red crosses serve yellow ones; docs/training.md).
    Without it the language model first learns the caption pattern and ignores the image for a
    long, seed-dependent while; with it the encoder learns to see from the first steps, and
    every patch keeps a readable "where am I" code, which the position words of a caption need.
    It reads the features through a forward hook, so the model's code stays untouched."""

    def __init__(self, vision: torch.nn.Module, vit_dim: int, recolour: bool = True):
        super().__init__()
        self.shape = torch.nn.Linear(vit_dim, len(SHAPES) + 1)
        self.colour = torch.nn.Linear(vit_dim, len(COLOURS) + 1)
        self.where = torch.nn.Linear(vit_dim, 9)
        self.outline = torch.nn.Linear(vit_dim, OUTLINE_SIDE ** 2)
        self.feats = None
        self.vision = [vision] if recolour else None      # a list: the model owns the encoder, not the probe
        vision.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.feats = output if module.training else None

    def forward(self, batch):                                  # feats (B, N, Dv), cells (B, 2, 9)
        feats, cells, self.feats = self.feats.float(), batch["cells"], None    # held no longer than the step
        g = math.isqrt(feats.shape[1])
        outline = per_patch(silhouettes(batch["pixels"]), g, OUTLINE_SIDE).to(feats.device)
        loss = self._cells(feats, cells, outline, colour=True)
        vision = self.vision and self.vision[0]
        if vision and next(vision.parameters()).requires_grad:   # an encoder that learns sees the scenes again
            px = batch["pixels"]                 # with colour channels swapped (the order is the data's, so a
            perm = batch["recolour"].to(px.device)                              # resumed run replays it):
            px = px.gather(1, perm[:, :, None, None].expand_as(px))            # its shapes in new colours
            vision(normalise(px, vision.cfg))
            loss = loss + self._cells(self.feats.float(), cells, outline, colour=False)   # same silhouettes
            self.feats = None
        return loss

    def _cells(self, feats, cells, outline, colour: bool):
        B, N, D = feats.shape
        g = math.isqrt(N)
        grid = feats.transpose(1, 2).reshape(B, D, g, g)
        pooled = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, D)
        rows = (torch.arange(g, device=feats.device) * 3 // g)                 # patch row -> cell row
        cell_of_patch = (rows[:, None] * 3 + rows[None, :]).flatten().expand(B, N)
        ce = F.cross_entropy
        loss = (ce(self.shape(pooled).flatten(0, 1), cells[:, 0].flatten())
                + ce(self.where(feats).flatten(0, 1), cell_of_patch.flatten())
                + F.binary_cross_entropy_with_logits(self.outline(feats), outline))
        if not colour:
            return loss
        colours = cells[:, 1].flatten()                        # a recoloured item's are IGNORE: a mean over
        named = (colours != IGNORE).sum().clamp(min=1)         # the rest, 0 when a batch has none
        return loss + ce(self.colour(pooled).flatten(0, 1), colours, reduction="sum") / named
