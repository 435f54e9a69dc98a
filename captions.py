"""Captioned images as training data: what a source has read (Rows), and the data sets made of it.

    Rows: (ImageRef, [captions]) per image          folders.py (local layouts) / hub.py (HF)
      -> check_images: every image decoded once (images.py), bad ones dropped and named
      -> CaptionSet: item = image + one caption per epoch inside an instruction prompt
      -> Mixture of several sets with weights
Every item is {"image": PIL.Image, "messages": [user prompt, assistant caption]}, what
collate.Collator expects. A bad image never ends a run: it is skipped, counted and named.
"""
from __future__ import annotations

import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distributed import on_rank0
from errors import UserError
from images import MAX_PIXELS, BadImage, ImagePolicy, decode

PROMPTS = ["描述这张图片", "描述一下这张图片。", "图里有什么？", "请用一句话描述这张图片。", "这张图片展示了什么？",
           "Describe this image.", "What is in this picture?", "Write a caption for this image.",
           "What do you see in this image?"]
PROMPT_ZH, PROMPT_EN = PROMPTS[0], PROMPTS[5]       # the one prompt used for evaluation
CAPTION_NAMES = ("caption", "captions", "sentences", "text", "txt", "caption_zh", "caption_en", "alt_text",
                 "original_alt_text", "answer", "description", "raw")
GROUPED = re.compile(r"^(caption|captions|sentence|sentences|text|description)_?(\d+)$")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)



# ----------------------------------------------------------------------------- captions

def caption_list(value) -> list[str]:
    """str | list[str] | {"raw": ...} | list[{"raw": ...}] -> non-empty stripped captions."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        for key in ("raw", "caption", "text", "sentence"):
            if key in value:
                return caption_list(value[key])
        return []
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in caption_list(v)]
    return []


def caption_columns(cols, exclude=None) -> list[str]:
    """The caption columns among `cols`: numbered ones (caption_0..caption_4) in order, else the
    first usual name (caption, text, ...); [] when there is none."""
    grouped = sorted((int(m.group(2)), c) for c in cols if (m := GROUPED.match(c)))
    first = next((c for c in CAPTION_NAMES if c in cols and c != exclude), None)
    return [c for _, c in grouped] or ([first] if first else [])


def caption_language(texts) -> str:
    texts = list(texts)[:2000]
    cjk = sum(bool(re.search(r"[\u4e00-\u9fff]", t)) for t in texts)
    return "zh" if texts and cjk * 2 >= len(texts) else "en"


def sample(image: Image.Image, prompt: str, caption: str) -> dict:
    return {"image": image, "messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": caption}]}


# ----------------------------------------------------------------------------- where images are

def inside(root: Path, rel: str) -> Path:
    """root/rel, refusing absolute paths and paths that leave root (../, symlinks out)."""
    if not rel or os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel) or ".." in Path(rel).parts:
        raise BadImage("路径指向数据文件夹之外，已拒绝")
    p = root / rel
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        raise BadImage("路径指向数据文件夹之外，已拒绝") from None
    return p


def cell_source(value, root: Path | None = None):
    """A cell of an image column -> what images.decode reads (bytes or a path). An Image cell is
    {"bytes", "path"}; a path cell of a local copy stays inside its folder `root`."""
    if isinstance(value, dict):          # an Image column: bytes, or a file datasets itself resolved
        value = value.get("bytes") or value.get("path")
    elif isinstance(value, str) and root is not None:
        value = str(inside(root, value))
    if value is None:
        raise BadImage("图片为空")
    return value


@dataclass(frozen=True)
class ImageRef:
    """Where one image is: a file (`path`) or a row of its Rows' table (`row`; `item` picks one
    image of a cell that holds a list of them); or, for a path refused before anything was
    read, why (`refused`)."""
    path: str | None = None
    row: int | None = None
    refused: str | None = None
    item: int | None = None


@dataclass
class Rows:
    """What a loader found: images with their captions, one entry of each list per image."""
    name: str
    refs: list                     # ImageRef per image
    captions: list                 # list[list[str]] per image
    names: list                    # printable name per image
    table: object = None           # HF Dataset holding only the image column (decode=False)
    image_kind: str = "path"       # the table's image column: image | path | bytes
    root: Path | None = None       # for relative path columns of local HF copies
    empty_captions: int = 0

    def source(self, ref: ImageRef):
        """What images.decode reads for `ref`: a path or bytes; BadImage if there is none."""
        if ref.refused:
            raise BadImage(ref.refused)
        if ref.path is not None:
            return ref.path
        cell = self.table[ref.row][self.table.column_names[0]]
        return cell_source(cell if ref.item is None else cell[ref.item], self.root)

    def texts(self) -> list[str]:
        return [c for caps in self.captions for c in caps]


# ----------------------------------------------------------------------------- data sets

class CaptionSet(torch.utils.data.Dataset):
    """Map-style, keyed (epoch, index): each epoch an image comes with one of its captions, drawn
    afresh, inside one of several instruction prompts. all_captions=True makes every caption its
    own item instead. Images that fail to decode at run time are replaced by the next good one."""

    epoch_keys = True
    scores_captions = True              # its items have reference captions for BLEU / CIDEr

    def __init__(self, rows: Rows, image_size: int, seed: int = 0, all_captions: bool = False,
                 max_pixels: int = MAX_PIXELS, keep=None):
        self.rows, self.image_size, self.seed, self.max_pixels = rows, image_size, seed, max_pixels
        keep = range(len(rows.refs)) if keep is None else keep
        self.images = [i for i in keep if not rows.refs[i].refused and rows.captions[i]]
        self.index = ([(i, c) for i in self.images for c in range(len(rows.captions[i]))] if all_captions
                      else [(i, None) for i in self.images])
        self.runtime_bad = 0
        self.bad = []                 # (name, reason) found by check_images

    def __len__(self):
        return len(self.index)

    def subset(self, positions, all_captions: bool | None = None) -> "CaptionSet":
        """A CaptionSet over some of this set's images (positions into self.images)."""
        if all_captions is None:
            all_captions = len(self.index) > len(self.images)
        return CaptionSet(self.rows, self.image_size, self.seed, all_captions, self.max_pixels,
                          [self.images[p] for p in positions])

    def load(self, i: int) -> Image.Image:
        return decode(self.rows.source(self.rows.refs[i]), self.image_size, ImagePolicy(self.max_pixels))

    def references(self, k: int) -> list[str]:
        return self.rows.captions[self.index[k][0]]

    def image(self, k: int) -> Image.Image:
        return self.load(self.index[k][0])

    def messages(self, epoch: int, k: int, i: int, c: int | None) -> list:
        """Item k's conversation in `epoch` about image i: caption c (or one drawn) in a prompt."""
        rng = random.Random(f"{self.seed}/{epoch}/{k}")
        caps = self.rows.captions[i]
        caption = caps[c] if c is not None else rng.choice(caps)
        return sample(None, rng.choice(PROMPTS), caption)["messages"]

    def chat(self, k: int) -> tuple[str, int, list]:
        """(name, number of images, messages) of item k in epoch 0, no image decoded."""
        i, c = self.index[k]
        return self.rows.names[i], 1, self.messages(0, k, i, c)

    def __getitem__(self, key):
        epoch, k = key if isinstance(key, tuple) else (0, key)
        p, image = first_readable(self, k, len(self.index), lambda p: self.load(self.index[p][0]),
                                  lambda p: f"无法使用的图片 {self.rows.names[self.index[p][0]]}",
                                  f"数据集 {self.rows.name} 里没有一张能读取的图片。")
        i, c = self.index[p]
        return {"image": image, "messages": self.messages(epoch, k, i, c)}


def first_readable(part, k: int, n: int, read, named, none: str):
    """(position, read(position)) for the first of positions k, k+1, ... (mod n) whose images
    decode: a bad one is counted in part.runtime_bad, the first three named; none -> UserError."""
    for attempt in range(n):
        p = (k + attempt) % n
        try:
            return p, read(p)
        except BadImage as e:
            part.runtime_bad += 1
            if part.runtime_bad <= 3:
                log(f"警告：跳过{named(p)}（{e}）")
    raise UserError(none)


def check_images(data: CaptionSet, max_bad_ratio: float, workers: int = 0) -> CaptionSet:
    """Decode every image once (in threads; PIL releases the GIL) before training starts; under
    torchrun rank 0 alone decodes and the other ranks take its result. Bad ones are dropped,
    counted and the first few named; above max_bad_ratio the run stops."""
    rows = data.rows
    refused = [i for i, r in enumerate(rows.refs) if r.refused]
    results = on_rank0(lambda: decode_all(data, workers))         # under torchrun: rank 0 decodes, all get it
    bad = [(rows.names[i], rows.refs[i].refused) for i in refused]
    bad += [(rows.names[i], err) for i, err in zip(data.images, results) if err]
    total = len(data.images) + len(refused)
    if rows.empty_captions:
        log(f"{rows.name}：{rows.empty_captions} 张图片没有非空描述，已跳过。")
    if bad:
        share = len(bad) / max(1, total)
        named = "、".join(f"{n}（{why}）" for n, why in bad[:5]) + ("等" if len(bad) > 5 else "")
        if share > max_bad_ratio:
            raise UserError(f"{rows.name} 中 {len(bad)}/{total} 张图片无法使用（{share:.1%}，超过 --max-bad-ratio "
                            f"{max_bad_ratio:.0%}），训练未开始：{named}。请修复或删除这些文件，或调高 --max-bad-ratio。")
        log(f"{rows.name}：跳过 {len(bad)}/{total} 张无法使用的图片（{share:.1%}）：{named}")
    good = {i for i, err in zip(data.images, results) if not err}
    kept = data.subset([p for p, i in enumerate(data.images) if i in good])
    kept.bad = bad
    return kept


def decode_all(data: CaptionSet, workers: int) -> list:
    """Each of data.images decoded in threads: None if it can be used, else why not."""
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _try_load(data, i), data.images))


def _try_load(data: CaptionSet, i: int):
    try:
        data.load(i)
        return None
    except BadImage as e:
        return str(e)


class Mixture(torch.utils.data.Dataset):
    """Several sets as one, keyed (epoch, index). Weight w gives a set round(w * len) items per
    epoch: 2 shows each image twice, 0.5 a different half each epoch."""

    epoch_keys = True

    def __init__(self, parts, weights=None, seed: int = 0):
        self.parts, self.seed = list(parts), seed
        weights = weights or [1.0] * len(self.parts)
        self.sizes = [max(1, round(w * len(p))) if len(p) else 0 for p, w in zip(self.parts, weights)]
        self.starts = np.cumsum([0] + self.sizes)
        self._perm = {}

    def __len__(self):
        return int(self.starts[-1])

    def split_by_node(self, rank: int, world: int):
        """Under torchrun (sources.Sources.training_data calls this): streamed parts give each rank its own rows."""
        for part in self.parts:
            if hasattr(part, "split_by_node"):
                part.split_by_node(rank, world)

    def shards(self) -> int | None:
        """The fewest shards of a streamed part (None without one): DataLoader workers beyond
        that would idle, since datasets gives each worker whole shards."""
        return min((p.num_shards for p in self.parts if getattr(p, "num_shards", None)), default=None)

    def perm(self, part: int, epoch: int):
        if (part, epoch) not in self._perm:
            self._perm = {k: v for k, v in self._perm.items() if k[1] == epoch}     # this epoch's only
            g = torch.Generator().manual_seed(self.seed * 7919 + part * 104729 + epoch)
            self._perm[part, epoch] = torch.randperm(len(self.parts[part]), generator=g).tolist()
        return self._perm[part, epoch]

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        part = int(np.searchsorted(self.starts, i, side="right") - 1)
        s, data = i - int(self.starts[part]), self.parts[part]
        n = len(data)
        if self.sizes[part] == n:
            return data[(epoch, s)]
        return data[(epoch * 1000 + s // n, self.perm(part, epoch)[s % n])]
