"""Hugging Face data sets: hub ids, local copies (save_to_disk, parquet/arrow/csv/json files,
webdataset .tar shards, globs, imagefolders), and streams of either.

    name -> open (hub: parquet conversion for script data sets, offline when unreachable;
                  local: the builder its files call for)
      -> pick_split (a `split` column is filtered by value, else the data set's splits)
      -> find_columns (image column and its kind, caption columns)
      -> Rows over a table of the image column alone (load_hf), or StreamCaptions (load_stream)
Images stay undecoded bytes (select): images.decode is the one decoder, so a corrupt image is
a skipped row, not the end of the run.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import socket
import tarfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from captions import PROMPTS, ImageRef, Rows, caption_columns, caption_list, cell_source, log, sample
from errors import UserError
from images import MAX_PIXELS, BadImage, ImagePolicy, decode

PARQUET_REVISION = "refs/convert/parquet"
# hub data sets that are loading scripts; datasets >= 4 refuses those, their parquet copy loads
SCRIPT_DATASETS = {"nlphuji/flickr30k", "nlphuji/flickr8k", "nlphuji/flickr_1k_test_image_text_retrieval"}
VAL_SPLITS = ("validation", "val", "valid", "dev")
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "photo")
PATH_NAMES = ("file_name", "filename", "image_path", "img_path", "path", "file", "image_file")
URL_NAMES = ("url", "image_url", "img_url", "coco_url", "flickr_url", "URL", "link")
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json",
            ".tar": "webdataset"}


# ----------------------------------------------------------------------------- opening

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


LOCAL_KINDS = ("parquet、arrow、csv、json/jsonl 文件，webdataset .tar 分片（可用通配符），save_to_disk 文件夹，"
               "或带 metadata.jsonl / metadata.csv 的图片文件夹")


def local_files(path: str) -> list[Path]:
    """The files a local glob or file name stands for; one clear line for a glob that matches
    nothing or an empty file (datasets would fail with an IndexError or a parser's message)."""
    if "://" in path:                   # a remote fsspec path: datasets resolves it
        return []
    files = [Path(f) for f in sorted(glob.glob(path, recursive=True))] if "*" in path else [Path(path)]
    if not files:
        raise UserError(f"通配符 {path} 没有匹配到任何文件（相对于当前目录 {Path.cwd()}）。请检查文件夹和扩展名，"
                        f"并给通配符加上引号；--dataset-name 支持 {LOCAL_KINDS}。")
    empty = [f for f in files if f.is_file() and f.stat().st_size == 0]
    if empty:
        more = f"（共 {len(empty)} 个空文件）" if len(empty) > 1 else ""
        raise UserError(f"{empty[0]} 是空文件（0 字节）{more}，里面没有数据。请重新生成或下载，或者不再用它训练。")
    return files


@contextmanager
def reading(path: str):
    """A local copy's files that datasets cannot read -> one clear line naming them (datasets'
    own error log of the same failure is held back)."""
    import datasets
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    except FileNotFoundError as e:
        if Path(path).is_dir():
            raise UserError(f"文件夹 {path} 里没有可读的数据文件。--dataset-name 支持 {LOCAL_KINDS}；"
                            f"captions.json 格式的文件夹请用 --data-path。") from None
        raise UserError(unreadable(path, e)) from None
    except datasets.exceptions.DatasetGenerationError as e:
        if type(e.__cause__).__name__ == "SchemaInferenceError":
            raise UserError(f"{path} 里没有任何数据行（数据文件是空的？）。") from None
        raise UserError(unreadable(path, e.__cause__ or e)) from None
    except (ValueError, tarfile.ReadError) as e:
        raise UserError(unreadable(path, e)) from None
    finally:
        log.setLevel(level)


def unreadable(path: str, e: Exception) -> str:
    return f"无法读取数据集 {path}：{str(e).rstrip('.')}。请检查文件是否完整（比如下载中断）。"


def open_local_hf(path: str, streaming: bool):
    """A save_to_disk folder, parquet/arrow/csv/json files, webdataset .tar shards (a file, a
    folder or a glob), or an imagefolder."""
    import datasets
    p = Path(path)
    with reading(path):
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else (
                datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in ds.items()}) if streaming else ds)
        if p.is_dir():
            return datasets.load_dataset(str(p), streaming=streaming)
        suffix = Path(path.replace("*", "x")).suffix
        if suffix in BUILDERS and (p.is_file() or "*" in path):
            local_files(path)
            return datasets.load_dataset(BUILDERS[suffix], data_files=path, streaming=streaming)
    if p.is_file():
        raise UserError(f"{path} 不是能识别的数据文件（扩展名 {p.suffix or '无'}）。--dataset-name 支持 {LOCAL_KINDS}。")
    raise UserError(f"找不到数据集 {path}：既不是本地路径，也不像 Hugging Face 数据集名（owner/name）。")


def open_split(name: str, split: str, streaming: bool):
    """(train, validation or None) of a hub id or a local copy."""
    loaded = open_hub(name, streaming) if is_hub_id(name) else open_local_hf(name, streaming)
    return pick_split(loaded, name, split)


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
            base = select(base, list(features))
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


# ----------------------------------------------------------------------------- columns

def find_columns(features: dict, name: str, image_column=None, caption_column=None):
    """(image column, its kind: image|path|bytes, [caption columns]) from a features mapping."""
    from datasets import Image as HFImage, Value
    cols = list(features)
    if not cols:                        # a stream whose first file could not be parsed
        raise UserError(f"数据集 {name} 里读不出任何列（数据文件是空的或格式不对？）。")
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
        caps = caption_columns(cols, exclude=image)
        if not caps:
            raise UserError(f"在数据集 {name} 里找不到描述列（有：{', '.join(cols)}），请用 --caption-column 指定。")
    return image, kind, caps


def select(ds, columns):
    """Only these columns, every Image column among them left undecoded (bytes): decoding is
    ours, so that a corrupt image is a skipped row and not the end of the stream."""
    from datasets import Image as HFImage
    ds = ds.select_columns(list(columns))
    for col, f in (ds.features or {}).items():
        if isinstance(f, HFImage) and f.decode:
            ds = ds.cast_column(col, HFImage(decode=False))
    return ds


def row_captions(row: dict, caption_cols) -> list[str]:
    return [c for col in caption_cols for c in caption_list(row.get(col))]


def table_rows(name: str, table, captions: list, kind: str, root=None) -> Rows:
    """Rows over `table` (the image column alone) for the rows that have captions."""
    keep = [i for i, c in enumerate(captions) if c]
    return Rows(name=name, refs=[ImageRef(row=i) for i in keep], captions=[captions[i] for i in keep],
                names=[f"{name}#{i}" for i in keep], table=table, image_kind=kind, root=root)


def rows_from_table(ds, name: str, image_column=None, caption_column=None, root=None) -> Rows:
    image, kind, caps = find_columns(ds.features, name, image_column, caption_column)
    values = ds.select_columns(caps).to_dict()
    captions = [row_captions({c: values[c][i] for c in caps}, caps) for i in range(len(ds))]
    rows = table_rows(name, select(ds, [image]), captions, kind, root)
    rows.empty_captions = len(captions) - len(rows.refs)
    return rows


def copy_root(name: str) -> Path | None:
    """The folder of a local copy: its path columns are read relative to it and may not leave
    it (captions.inside); None for a hub id."""
    if is_hub_id(name):
        return None
    p = Path(name.split("*")[0])
    return p if p.is_dir() else p.parent


def load_hf(name: str, split: str = "train", image_column=None, caption_column=None, opened=None):
    """(train Rows, validation Rows or None) for a hub id or a local copy (`opened`: its
    (train, validation) splits when the caller has opened them already)."""
    train, val = opened or open_split(name, split, False)
    root = copy_root(name)
    train_rows = rows_from_table(train, name, image_column, caption_column, root)
    val_rows = rows_from_table(val, name, image_column, caption_column, root) if val is not None and len(val) else None
    return train_rows, val_rows


# ----------------------------------------------------------------------------- streams

def load_stream(name: str, split: str, image_column, caption_column, val_rows: int, head: int, opened=None):
    """(train stream, validation Rows or None): the first `val_rows` rows of the validation
    split, or without one the stream's first `head` rows, which then are not trained on."""
    train, val = opened or open_split(name, split, True)
    rows = stream_head(val, name, val_rows, image_column, caption_column) if val is not None else None
    if rows is None:
        rows = stream_head(train, name, head, image_column, caption_column)
        train = train.skip(head)
    return train, rows


def stream_texts(stream, name: str, count: int, image_column=None, caption_column=None) -> list[str]:
    """Captions of the first `count` rows (for the tokenizer), without fetching their images."""
    _, _, caps = find_columns(stream.features or {}, name, image_column, caption_column)
    return [c for row in stream.select_columns(caps).take(count) for c in row_captions(row, caps)]


def stream_head(stream, name: str, count: int, image_column=None, caption_column=None) -> Rows:
    """The first `count` rows of a stream as an in-memory Rows (for validation)."""
    from datasets import Dataset
    image, kind, caps = find_columns(stream.features or {}, name, image_column, caption_column)
    rows = list(select(stream, [image] + caps).take(count))
    if not rows:
        return None
    table = Dataset.from_dict({image: [r[image] for r in rows]})
    return table_rows(name, table, [row_captions(r, caps) for r in rows], kind, copy_root(name))


class StreamCaptions(torch.utils.data.Dataset):
    """A streamed data set seen through the trainer's keyed interface: every request takes the
    next row of a shuffled stream (the key only selects the epoch, for caption choice), so no
    length is needed; `length` only sets how many items make an epoch. Bad rows are skipped.
    In DataLoader workers, datasets splits the stream between workers by shard."""

    epoch_keys = True

    def __init__(self, stream, name: str, length: int, image_size: int, image_column=None, caption_column=None,
                 seed: int = 0, buffer: int = 1000, max_pixels: int = MAX_PIXELS, max_bad_ratio: float = 0.05):
        self.image, _, self.caps = find_columns(stream.features or {}, name, image_column, caption_column)
        stream = select(stream, [self.image] + self.caps)
        self.stream = stream.shuffle(seed=seed, buffer_size=buffer) if buffer > 1 else stream
        self.name, self.length, self.image_size, self.seed = name, length, image_size, seed
        self.root = copy_root(name)
        self.max_pixels, self.max_bad_ratio = max_pixels, max_bad_ratio
        self.it, self.pass_no, self.seen, self.runtime_bad = None, 0, 0, 0

    def __len__(self):
        return self.length

    @property
    def num_shards(self) -> int:
        return self.stream.num_shards

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
            try:
                if not caps:
                    continue
                image = decode(cell_source(row[self.image], self.root), self.image_size, ImagePolicy(self.max_pixels))
                break
            except BadImage as e:
                self.runtime_bad += 1
                if self.runtime_bad <= 3:
                    log(f"警告：跳过 {self.name} 第 {self.seen} 行的图片（{e}）")
                if self.seen >= 50 and self.runtime_bad / self.seen > self.max_bad_ratio:
                    raise UserError(f"{self.name} 已读 {self.seen} 行，其中 {self.runtime_bad} 张图片无法使用，超过 "
                                    f"--max-bad-ratio {self.max_bad_ratio:.0%}，训练已停止。") from None
        rng = random.Random(f"{self.seed}/{epoch}/{k}/{self.seen}")
        return sample(image, rng.choice(PROMPTS), rng.choice(caps))
