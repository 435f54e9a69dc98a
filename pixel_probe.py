"""An auxiliary target for a vision encoder trained from scratch on any pictures.

A ViT started from random weights learns to see slowly from the language loss alone: the language
model first learns what answers usually say and ignores the image for a long while. From each
patch's output feature, PixelProbe predicts that patch's own pixels at low resolution (an
autoencoder target that needs no labels), so from the first steps the features carry the colours
and outlines of what lies in each patch. The synthetic demo has a sharper target (scenes.CellProbe:
the shape and colour in each cell); this one works for a user's own photos. It reads the features
through a forward hook, so the model's code stays untouched, and it is not saved with the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from images import normalise


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
        """(M, 3, H, W) -> (M, grid², 3·side²): each patch's normalised pixels pooled to side×side, row-major."""
        g, s = self.grid, self.side
        small = F.adaptive_avg_pool2d(normalise(pixels, self.cfg), g * s)                     # (M, 3, g·s, g·s)
        return small.reshape(-1, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)

    def forward(self, batch):
        feats, self.feats = self.feats, None
        if feats is None or batch.get("pixels") is None:     # a batch of text-only samples
            return self.head.weight.sum() * 0.0
        return F.mse_loss(self.head(feats.float()), self.targets(batch["pixels"]))


def for_model(model) -> PixelProbe | None:
    """A PixelProbe when the model's vision encoder is the built-in ViT (no pretrained source) and
    it trains; pretrained towers already see, and a frozen encoder cannot learn from it."""
    vision, cfg = model.vision, model.cfg
    if vision.source is not None or not any(p.requires_grad for p in vision.parameters()):
        return None
    return PixelProbe(vision, cfg)
