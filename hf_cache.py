"""transformers' DynamicCache with the view the server's engine works in (engine.py): every
layer's keys and values stacked into (L, B, H_kv, T, hd) tensors, and a cache rebuilt from such
tensors. backbones.HFLanguageModel.new_cache returns it; transformers is imported only with it."""
from __future__ import annotations

import torch
from transformers import DynamicCache


class StackedDynamicCache(DynamicCache):
    """Built without the model's config, so every layer is a plain full-attention layer: no
    sliding-window trimming, all layers hold the same columns and stack. A sliding-window model
    still attends only within its window (transformers builds that mask from the config), it
    only keeps older keys it won't look at."""

    def stacked(self):
        """(k, v, length): k, v (L, B, H_kv, length, hd)."""
        k = torch.stack([layer.keys for layer in self.layers])
        return k, torch.stack([layer.values for layer in self.layers]), k.shape[3]

    @classmethod
    def from_stacked(cls, k, v, length: int) -> "StackedDynamicCache":
        """A cache continuing from stacked() tensors (columns past length are ignored)."""
        cache = cls()
        for layer in range(k.shape[0]):
            cache.update(k[layer, :, :, :length], v[layer, :, :, :length], layer)
        return cache
