"""Real captioned images: local folders, Hugging Face data sets, mixing, decoding, verification.

    source (folder / hub id / local HF copy)
      -> rows: (image reference, [captions])          load_local / load_hf
      -> decode + verify (images.py: limits, EXIF, RGB) check_images
      -> CaptionSet: item = image + one caption per epoch in an instruction prompt
      -> Mixture of several sets with weights          Mixture
Every item is {"image": PIL.Image, "messages": [user prompt, assistant caption]}, what
collate.Collator expects. A bad image never ends a run: it is skipped, counted and named.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from errors import UserError
from images import MAX_PIXELS, BadImage, ImagePolicy, decode

PARQUET_REVISION = "refs/convert/parquet"
# hub data sets that are loading scripts; datasets >= 4 refuses those, their parquet copy loads
SCRIPT_DATASETS = {"nlphuji/flickr30k", "nlphuji/flickr8k", "nlphuji/flickr_1k_test_image_text_retrieval"}
VAL_SPLITS = ("validation", "val", "valid", "dev")
PROMPTS = ["描述这张图片", "描述一下这张图片。", "图里有什么？", "请用一句话描述这张图片。", "这张图片展示了什么？",
           "Describe this image.", "What is in this picture?", "Write a caption for this image.",
           "What do you see in this image?"]
PROMPT_ZH, PROMPT_EN = PROMPTS[0], PROMPTS[5]       # the one prompt used for evaluation
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "photo")
PATH_NAMES = ("file_name", "filename", "image_path", "img_path", "path", "file", "image_file")
URL_NAMES = ("url", "image_url", "img_url", "coco_url", "flickr_url", "URL", "link")
CAPTION_NAMES = ("caption", "captions", "sentences", "text", "txt", "caption_zh", "caption_en", "alt_text",
                 "original_alt_text", "answer", "description", "raw")
GROUPED = re.compile(r"^(caption|captions|sentence|sentences|text|description)_?(\d+)$")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- paths

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


def find_columns(features: dict, name: str, image_column=None, caption_column=None):
    """(image column, its kind: image|path|bytes, [caption columns]) from a features mapping."""
    from datasets import Image as HFImage, Value
    cols = list(features)
    if image_column:
        if image_column not in cols:
            raise UserError(f"数据集 {name} 没有列 {image_column!r}（有：{', '.join(cols)}）。")
        image = image_column
    else:
        image = next((c for c in cols if isinstance(features[c], HFImage)), None)
        image = image or next((c for c in IMAGE_NAMES + PATH_NAMES if c in cols), None)
        if image is None:
            url = next((c for c in URL_NAMES if c in cols), None)
            if url:
                raise UserError(f"数据集 {name} 只有图片链接（列 {url}），没有图片本身。请先用 img2dataset 把图片下载成 "
                                f"webdataset 分片（.tar），再用 --dataset-name 指向这些文件，见 docs/datasets.md。")
            raise UserError(f"在数据集 {name} 里找不到图片列（有：{', '.join(cols)}），请用 --image-column 指定。")
    f = features[image]
    kind = ("image" if isinstance(f, HFImage) else "bytes" if isinstance(f, Value) and f.dtype in ("binary", "large_binary")
            else "path")
    if caption_column:
        caps = [c.strip() for c in caption_column.split(",") if c.strip()]
        missing = [c for c in caps if c not in cols]
        if missing:
            raise UserError(f"数据集 {name} 没有列 {', '.join(missing)}（有：{', '.join(cols)}）。")
    else:
        grouped = sorted((int(m.group(2)), c) for c in cols if (m := GROUPED.match(c)))
        caps = [c for _, c in grouped] or [next((c for c in CAPTION_NAMES if c in cols and c != image), None)]
        if caps == [None]:
            raise UserError(f"在数据集 {name} 里找不到描述列（有：{', '.join(cols)}），请用 --caption-column 指定。")
    return image, kind, caps


def row_captions(row: dict, caption_cols) -> list[str]:
    return [c for col in caption_cols for c in caption_list(row.get(col))]


# ----------------------------------------------------------------------------- data sets

@dataclass
class Rows:
    """What a loader found: images (paths or row numbers of `table`) with their captions."""
    name: str
    refs: list                     # str path | int row of table | BadImage (refused before reading)
    captions: list                 # list[list[str]] per ref
    names: list                    # printable name per ref
    table: object = None           # HF Dataset holding only the image column (decode=False)
    image_kind: str = "path"
    root: Path | None = None       # for relative path columns of local HF copies
    empty_captions: int = 0


class CaptionSet(torch.utils.data.Dataset):
    """Map-style, keyed (epoch, index): each epoch an image comes with one of its captions, drawn
    afresh, inside one of several instruction prompts. all_captions=True makes every caption its
    own item instead. Images that fail to decode at run time are replaced by the next good one."""

    epoch_keys = True

    def __init__(self, rows: Rows, image_size: int, seed: int = 0, all_captions: bool = False,
                 max_pixels: int = MAX_PIXELS, keep=None):
        self.rows, self.image_size, self.seed, self.max_pixels = rows, image_size, seed, max_pixels
        keep = range(len(rows.refs)) if keep is None else keep
        self.images = [i for i in keep if not isinstance(rows.refs[i], BadImage) and rows.captions[i]]
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
        ref = self.rows.refs[i]
        if isinstance(ref, str):
            return decode(ref, self.image_size, ImagePolicy(self.max_pixels))
        value = self.rows.table[ref][self.rows.table.column_names[0]]
        if isinstance(value, dict):          # an Image column: bytes, or a file datasets itself resolved
            value = value.get("bytes") or value.get("path")
        elif isinstance(value, str) and self.rows.root is not None:    # a path column: stays inside
            value = str(inside(self.rows.root, value))
        if value is None:
            raise BadImage("图片为空")
        return decode(value, self.image_size, ImagePolicy(self.max_pixels))

    def references(self, k: int) -> list[str]:
        return self.rows.captions[self.index[k][0]]

    def image(self, k: int) -> Image.Image:
        return self.load(self.index[k][0])

    def __getitem__(self, key):
        epoch, k = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self.index)):
            i, c = self.index[(k + attempt) % len(self.index)]
            try:
                image = self.load(i)
                break
            except BadImage as e:
                self.runtime_bad += 1
                if self.runtime_bad <= 3:
                    log(f"警告：跳过无法使用的图片 {self.rows.names[i]}（{e}）")
        else:
            raise UserError(f"数据集 {self.rows.name} 里没有一张能读取的图片。")
        rng = random.Random(f"{self.seed}/{epoch}/{k}")
        caps = self.rows.captions[i]
        caption = caps[c] if c is not None else rng.choice(caps)
        return {"image": image, "messages": [{"role": "user", "content": rng.choice(PROMPTS)},
                                             {"role": "assistant", "content": caption}]}


def check_images(data: CaptionSet, max_bad_ratio: float, workers: int = 0) -> CaptionSet:
    """Decode every image once (in threads; PIL releases the GIL) before training starts. Bad
    ones are dropped, counted and the first few named; above max_bad_ratio the run stops."""
    rows = data.rows
    refused = [i for i, r in enumerate(rows.refs) if isinstance(r, BadImage)]
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda i: _try_load(data, i), data.images))
    bad = [(rows.names[i], str(rows.refs[i])) for i in refused]
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
        """Under torchrun (the trainer calls this): streamed parts give each rank its own rows."""
        for part in self.parts:
            if hasattr(part, "split_by_node"):
                part.split_by_node(rank, world)

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


# ----------------------------------------------------------------------------- local folders

def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path} 不是 UTF-8 编码（第 {line} 行，第 {e.start} 字节处）。请用 UTF-8 另存该文件。") from None


def parse_json(path: Path, text: str, line_offset: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} 第 {e.lineno + line_offset} 行第 {e.colno} 列 JSON 格式错误：{e.msg}。") from None


def load_local(path: str) -> Rows:
    """A folder with captions.json ({"a.jpg": "caption" | ["c1", "c2"]}, images in images/ or
    beside it), or the imagefolder convention (metadata.jsonl / metadata.csv with file_name)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"找不到本地数据文件夹 {root}。请按 docs/datasets.md 准备 images/ 和 captions.json。")
    entries = []                                  # (relative path, caption value)
    if (root / "captions.json").is_file():
        f = root / "captions.json"
        obj = parse_json(f, read_text(f))
        if isinstance(obj, dict):
            entries = list(obj.items())
        elif isinstance(obj, list) and all(isinstance(o, dict) for o in obj):
            for o in obj:
                key = next((k for k in ("image", "image_id", "file_name", "filename") if k in o), None)
                cap = next((k for k in ("caption", "captions", "text") if k in o), None)
                entries.append((str(o[key]) if key else "", o.get(cap) if cap else None))
        else:
            raise UserError(f"{f} 的格式应为 {{\"图片名.jpg\": \"描述\" 或 [\"描述1\", \"描述2\"]}}。")
        base = root / "images" if (root / "images").is_dir() else root

        def locate(rel):
            p = inside(base, rel)
            return p if p.exists() or base == root else inside(root, rel)
    elif (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        f = root / ("metadata.jsonl" if (root / "metadata.jsonl").is_file() else "metadata.csv")
        text = read_text(f)
        if f.suffix == ".jsonl":
            records = [parse_json(f, line, n) for n, line in enumerate(text.splitlines()) if line.strip()]
        else:
            records = list(csv.DictReader(io.StringIO(text)))
        if not records:
            raise UserError(f"{f} 是空的。")
        cols = list(records[0])
        if "file_name" not in cols:
            raise UserError(f"{f} 缺少 file_name 列（有：{', '.join(cols)}）。")
        grouped = sorted((int(m.group(2)), c) for c in cols if (m := GROUPED.match(c)))
        caps = [c for _, c in grouped] or [next((c for c in CAPTION_NAMES if c in cols), None)]
        if caps == [None]:
            raise UserError(f"{f} 里找不到描述列（如 caption、text）；有：{', '.join(cols)}。")
        for r in records:
            value = [r.get(c) for c in caps]
            if f.suffix == ".csv":                 # a csv cell may hold a JSON list of captions
                value = [json.loads(v) if isinstance(v, str) and v.startswith("[") and _is_json(v) else v
                         for v in value]
            entries.append((str(r.get("file_name") or ""), value))

        def locate(rel):
            return inside(root, rel)
    else:
        raise UserError(f"{root} 里既没有 captions.json，也没有 metadata.jsonl / metadata.csv。格式见 docs/datasets.md。")
    rows = Rows(name=str(root), refs=[], captions=[], names=[])
    for rel, value in entries:
        caps = caption_list(value)
        if not caps:
            rows.empty_captions += 1
            continue
        try:
            ref = str(locate(rel))
        except BadImage as e:
            ref = e
        rows.refs.append(ref)
        rows.captions.append(caps)
        rows.names.append(rel)
    if not rows.refs:
        raise UserError(f"{root} 里没有带描述的图片。")
    return rows


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- Hugging Face

def is_hub_id(name: str) -> bool:
    return not Path(name).exists() and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.endswith(
        (".parquet", ".tar", ".arrow", ".json", ".jsonl", ".csv"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub (or HF_ENDPOINT mirror) instead of minutes of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def go_offline():
    import datasets
    import huggingface_hub.constants
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def open_hub(name: str, streaming: bool):
    """load_dataset for a hub id: script data sets go to their parquet conversion; offline or
    unreachable hub -> the local cache only, and one clear message if it is not there."""
    import datasets
    if not offline() and not hub_reachable():
        log(f"连不上 Hugging Face Hub（{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}），只查找本机缓存。")
        go_offline()
    revision = PARQUET_REVISION if name in SCRIPT_DATASETS else None
    if revision:
        log(f"{name} 是脚本式数据集，datasets≥4 不再支持；自动改用它的 Parquet 转换版本（revision={revision}）。")
    for attempt in range(2):
        try:
            return datasets.load_dataset(name, revision=revision, streaming=streaming)
        except RuntimeError as e:
            if "scripts are no longer supported" in str(e) and revision is None:
                revision = PARQUET_REVISION
                log(f"{name} 是脚本式数据集，datasets≥4 不再支持；改用它的 Parquet 转换版本（revision={revision}）。")
                continue
            raise
        except ConnectionError:
            raise UserError(f"无法连接 Hugging Face Hub，本机缓存里也没有数据集 {name}（本地也没有这个路径）。请联网后重试，或设置镜像"
                            f"（export HF_ENDPOINT=https://hf-mirror.com），或在有网的机器上下载后用 --dataset-name "
                            f"指向本地副本（见 docs/datasets.md）。") from None
        except datasets.exceptions.DatasetNotFoundError:
            raise UserError(f"Hugging Face Hub 上找不到数据集 {name}（或需要登录授权），本地也没有这个路径。请检查名称。") from None


def open_local_hf(path: str, streaming: bool):
    """A save_to_disk folder, parquet/arrow/csv/json files, webdataset .tar shards (a file, a
    folder or a glob), or an imagefolder."""
    import datasets
    p = Path(path)
    builders = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json",
                ".tar": "webdataset"}
    try:
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else (
                datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()}) if streaming else ds)
        if p.is_dir():
            return datasets.load_dataset(str(p), streaming=streaming)
        suffix = Path(path.replace("*", "x")).suffix
        if suffix in builders and (p.is_file() or "*" in path):
            return datasets.load_dataset(builders[suffix], data_files=path, streaming=streaming)
    except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError, ValueError) as e:
        raise UserError(f"无法读取数据集 {path}：{e}") from None
    raise UserError(f"找不到数据集 {path}：既不是本地路径，也不像 Hugging Face 数据集名（owner/name）。")


def pick_split(loaded, name: str, split: str):
    """(train, validation or None). A `split` column (Flickr30k's one "test" split holds
    train/val/test rows) is filtered by value; otherwise the data set's own splits are used."""
    import datasets
    splits = dict(loaded) if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)) else {"train": loaded}
    if split in splits:
        base = splits[split]
    elif len(splits) == 1:
        base = next(iter(splits.values()))
    else:
        raise UserError(f"数据集 {name} 没有划分 {split!r}（有：{', '.join(splits)}），请用 --split 指定。")
    features = base.features or {}
    if "split" in features and getattr(features["split"], "dtype", None) == "string":
        if isinstance(base, datasets.IterableDataset):
            log(f"{name}：按 split 列筛选 {split!r} 行作为训练数据。")
            base = undecoded(base)
            return (base.filter(lambda v: v == split, input_columns=["split"]),
                    base.filter(lambda v: v in VAL_SPLITS, input_columns=["split"]))
        values = base.select_columns(["split"]).to_dict()["split"]
        found = sorted(set(values))
        if split not in found:
            raise UserError(f"数据集 {name} 的 split 列里没有 {split!r}（有：{', '.join(found)}），请用 --split 指定。")
        train = [i for i, v in enumerate(values) if v == split]
        val = [i for i, v in enumerate(values) if v in VAL_SPLITS and v != split]
        log(f"{name}：按 split 列筛选，训练用 {split!r} 的 {len(train)} 行" + (f"，验证用 {len(val)} 行。" if val else "。"))
        return base.select(train), (base.select(val) if val else None)
    if split not in splits:
        raise UserError(f"数据集 {name} 没有划分 {split!r}（有：{', '.join(splits)}），请用 --split 指定。")
    val = next((splits[v] for v in VAL_SPLITS if v in splits and v != split), None)
    return base, val


def undecoded(ds):
    """The same data set with every Image column left as bytes: decoding is ours, so that a
    corrupt image is a skipped row and not the end of the stream."""
    from datasets import Image as HFImage
    for col, f in (ds.features or {}).items():
        if isinstance(f, HFImage) and f.decode:
            ds = ds.cast_column(col, HFImage(decode=False))
    return ds


def rows_from_table(ds, name: str, image_column=None, caption_column=None, root=None) -> Rows:
    from datasets import Image as HFImage
    image, kind, caps = find_columns(ds.features, name, image_column, caption_column)
    values = ds.select_columns(caps).to_dict()
    captions = [row_captions({c: values[c][i] for c in caps}, caps) for i in range(len(ds))]
    table = ds.select_columns([image])
    if kind == "image":
        table = table.cast_column(image, HFImage(decode=False))
    keep = [i for i, c in enumerate(captions) if c]
    return Rows(name=name, refs=keep, captions=[captions[i] for i in keep], names=[f"{name}#{i}" for i in keep],
                table=table, image_kind=kind, root=root, empty_captions=len(captions) - len(keep))


def load_hf(name: str, split: str = "train", image_column=None, caption_column=None):
    """(train Rows, validation Rows or None) for a hub id or a local copy."""
    loaded = open_hub(name, False) if is_hub_id(name) else open_local_hf(name, False)
    train, val = pick_split(loaded, name, split)
    p = Path(name.split("*")[0])
    root = (p if p.is_dir() else p.parent) if not is_hub_id(name) else None
    train_rows = rows_from_table(train, name, image_column, caption_column, root)
    val_rows = rows_from_table(val, name, image_column, caption_column, root) if val is not None and len(val) else None
    return train_rows, val_rows


class StreamCaptions(torch.utils.data.Dataset):
    """A streamed data set seen through the trainer's keyed interface: every request takes the
    next row of a shuffled stream (the key only selects the epoch, for caption choice), so no
    length is needed; `length` only sets how many items make an epoch. Bad rows are skipped.
    In DataLoader workers, datasets splits the stream between workers by shard."""

    epoch_keys = True

    def __init__(self, stream, name: str, length: int, image_size: int, image_column=None, caption_column=None,
                 seed: int = 0, buffer: int = 1000, max_pixels: int = MAX_PIXELS, max_bad_ratio: float = 0.05):
        from datasets import Image as HFImage
        self.image, kind, self.caps = find_columns(stream.features or {}, name, image_column, caption_column)
        stream = stream.select_columns([self.image] + self.caps)
        if kind == "image":
            stream = stream.cast_column(self.image, HFImage(decode=False))
        self.stream = stream.shuffle(seed=seed, buffer_size=buffer) if buffer > 1 else stream
        self.name, self.length, self.image_size, self.seed = name, length, image_size, seed
        self.max_pixels, self.max_bad_ratio = max_pixels, max_bad_ratio
        self.it, self.pass_no, self.seen, self.runtime_bad = None, 0, 0, 0

    def __len__(self):
        return self.length

    def split_by_node(self, rank: int, world: int):
        """Each rank reads a disjoint part of the stream: whole shards when their number divides
        evenly, else every world-th row. The stream is endless (it restarts), so every rank still
        fills the same `length` items per epoch and no rank waits for another at the end."""
        from datasets.distributed import split_dataset_by_node
        self.stream = split_dataset_by_node(self.stream, rank=rank, world_size=world)

    def rows(self):
        """Endless: when the stream ends it starts over with another shuffle."""
        while True:
            self.stream.set_epoch(self.pass_no)
            empty = True
            for row in self.stream:
                empty = False
                yield row
            if empty:
                raise UserError(f"流式数据集 {self.name} 是空的。")
            self.pass_no += 1

    def __getitem__(self, key):
        epoch, k = key if isinstance(key, tuple) else (0, key)
        if self.it is None:
            self.it = self.rows()
        while True:
            row = next(self.it)
            self.seen += 1
            caps = row_captions(row, self.caps)
            value = row[self.image]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            try:
                if not caps:
                    continue
                if value is None:
                    raise BadImage("图片为空")
                image = decode(value, self.image_size, ImagePolicy(self.max_pixels))
                break
            except BadImage as e:
                self.runtime_bad += 1
                if self.runtime_bad <= 3:
                    log(f"警告：跳过 {self.name} 第 {self.seen} 行的图片（{e}）")
                if self.seen >= 50 and self.runtime_bad / self.seen > self.max_bad_ratio:
                    raise UserError(f"{self.name} 已读 {self.seen} 行，其中 {self.runtime_bad} 张图片无法使用，超过 "
                                    f"--max-bad-ratio {self.max_bad_ratio:.0%}，训练已停止。") from None
        rng = random.Random(f"{self.seed}/{epoch}/{k}/{self.seen}")
        return {"image": image, "messages": [{"role": "user", "content": rng.choice(PROMPTS)},
                                             {"role": "assistant", "content": rng.choice(caps)}]}


def stream_texts(stream, name: str, count: int, image_column=None, caption_column=None) -> list[str]:
    """Captions of the first `count` rows (for the tokenizer), without fetching their images."""
    _, _, caps = find_columns(stream.features or {}, name, image_column, caption_column)
    return [c for row in stream.select_columns(caps).take(count) for c in row_captions(row, caps)]


def stream_head(stream, name: str, count: int, image_column=None, caption_column=None) -> Rows:
    """The first `count` rows of a stream as an in-memory Rows (for validation)."""
    from datasets import Dataset, Image as HFImage
    image, kind, caps = find_columns(stream.features or {}, name, image_column, caption_column)
    part = stream.select_columns([image] + caps)
    if kind == "image":
        part = part.cast_column(image, HFImage(decode=False))
    rows = list(part.take(count))
    if not rows:
        return None
    table = Dataset.from_dict({image: [r[image] for r in rows]})
    captions = [row_captions(r, caps) for r in rows]
    keep = [i for i, c in enumerate(captions) if c]
    return Rows(name=name, refs=keep, captions=[captions[i] for i in keep], names=[f"{name}#{i}" for i in keep],
                table=table, image_kind=kind)


# ----------------------------------------------------------------------------- sources and splits

def parse_source(spec: str) -> tuple[str, float]:
    """"path" or "path:weight" (weight > 0)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"\d+(\.\d+)?", tail):
        w = float(tail)
        if w <= 0:
            raise UserError(f"{spec}：权重必须大于 0。")
        return head, w
    return spec, 1.0


def holdout(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train positions, validation positions): a fixed random share held out, none for tiny sets."""
    order = list(range(n))
    random.Random(f"holdout/{seed}").shuffle(order)
    k = round(n * ratio) if n >= 10 else 0
    k = max(1, k) if n >= 10 and ratio > 0 else k
    return sorted(order[k:]), sorted(order[:k])


def caption_language(texts) -> str:
    texts = list(texts)[:2000]
    cjk = sum(bool(re.search(r"[\u4e00-\u9fff]", t)) for t in texts)
    return "zh" if texts and cjk * 2 >= len(texts) else "en"
