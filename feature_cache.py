"""CachedTower: a frozen vision tower behind a feature cache, so that training a projector or
adapters on a CPU encodes each image once, not once per epoch. The trainer puts it in the
model's place only around its forward passes (Trainer.cached_features)."""
from __future__ import annotations

import hashlib

import torch


class CachedTower(torch.nn.Module):
    """A frozen vision tower behind a feature cache: each distinct image's features are computed
    once and kept (up to `budget` bytes), so later epochs skip the tower. Images are told apart
    by a hash of their preprocessed pixels, so no data set has to cooperate; an image that
    changes (augmentation) is simply a new entry. To whatever watches the tower through a
    forward hook (probes.CellProbe), every batch looks as if the tower had seen it whole.
    CPU only: on a GPU the tower is cheap and hashing would copy every batch to the host."""

    def __init__(self, tower: torch.nn.Module, budget: float):
        super().__init__()
        self.tower, self.budget, self.used = tower, budget, 0
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.full = False                        # some features did not fit and are recomputed

    @torch.compiler.disable                     # hashing is host work: --compile runs it as it is
    def forward(self, pixels):
        keys = [hashlib.blake2b(p.contiguous().numpy(), digest_size=16).digest() for p in pixels.detach()]
        todo = {}                                       # key -> first image with it, if not stored
        for i, k in enumerate(keys):
            if k not in self.store:
                todo.setdefault(k, i)
        fresh = dict(zip(todo, self.tower.forward(pixels[list(todo.values())]))) if todo else {}
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        for k, f in fresh.items():
            if self.used + f.nbytes > self.budget:
                self.full = True
                continue
            self.store[k] = f.clone()                   # its own memory, not a view of the batch
            self.used += f.nbytes
        out = torch.stack([fresh[k] if k in fresh else self.store[k] for k in keys])
        for hook in self.tower._forward_hooks.values():
            hook(self.tower, (pixels,), out)
        return out

    def report(self) -> str:
        """One line for the user after the first epoch: what is kept, and whether the budget ran out."""
        return (f"视觉编码器是冻结的：{len(self.store)} 张图的特征已留在内存里（{self.used / 2 ** 20:.0f} MiB），"
                "之后各轮不再重算" + ("；内存上限已满，其余图片每轮照常计算（可调大 --feature-cache-gb）"
                                      if self.full else "") + "。")
