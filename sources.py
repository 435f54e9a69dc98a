"""Data sources: what --data-path / --dataset-name name, turned into training and validation
sets. train_vision_real.py and evaluate.py read real data only through here.

    --data-source / --data-path / --dataset-name "name[:weight]"          from_args
      -> the first Format in FORMATS that takes the name reads it into a source:
           texts()       its captions, for training a tokenizer (no image read yet)
           parts(size)   (training part, validation CaptionSet or None), images checked
      -> TrainingData: the training parts mixed with their weights, the validation parts
         mixed, and a fixed validation subset for caption metrics
A new kind of data is a module that reads it (into Rows, or into a source of its own with
texts() and parts()) plus one line in FORMATS.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Callable

import conversations
import folders
import hub
from captions import CaptionSet, Mixture, Rows, check_images
from distributed import dist_env, say
from errors import UserError
from images import MAX_PIXELS
from tokenizer import WORDS_FILE

DEFAULT_LOCAL = "data/vision_train"
MAX_VAL_IMAGES = 1000                   # validation loss is measured on at most this many images
STREAM_TEXTS = 2000                     # rows of a stream whose captions train the tokenizer


@dataclass
class Options:
    """How data is read: train_vision_real.py's data flags (evaluate.py gives a few of them)."""
    split: str = "train"
    image_column: str | None = None
    caption_column: str | None = None
    all_captions: bool = False
    streaming: bool = False
    shuffle_buffer: int = 1000
    steps_per_epoch: int = 1000
    batch_size: int = 8
    val_ratio: float = 0.05
    eval_size: int = 100
    max_bad_ratio: float = 0.05
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    workers: int = 0                    # threads decoding images for the check (0: up to 8)

    @classmethod
    def from_args(cls, a, **given) -> "Options":
        """From train_vision_real.py's flags (each field is a flag's name), `given` overriding."""
        return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if f.name not in given}, **given)


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


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One source as read: its training data, Rows of its validation split (if it has one),
    how it is read and its weight in the mixture. A kind of source gives train_texts() and
    parts(size) -> (training part, validation CaptionSet or None), its images checked."""
    name: str
    train: object
    val: Rows | None
    o: Options
    weight: float = 1.0
    has_captions = True                 # reference captions to score BLEU / CIDEr against

    def texts(self) -> list[str]:
        """Its captions, for training a tokenizer: the training ones, then the validation ones."""
        return self.train_texts() + (self.val.texts() if self.val else [])


class Table(Source):
    """A source read whole: `train` is the Rows of its training split."""

    def train_texts(self) -> list[str]:
        return self.train.texts()

    def checked(self, size: int, max_bad_ratio: float, all_captions: bool = False) -> CaptionSet:
        """Every image of the training split decoded once; bad ones dropped and named."""
        o = self.o
        return check_images(CaptionSet(self.train, size, o.seed, all_captions, o.max_pixels), max_bad_ratio, o.workers)

    def examine(self, size: int):
        part = self.checked(size, 1.0)
        return part, bad_lines(part)

    def parts(self, size: int):
        """(training CaptionSet, validation CaptionSet or None); without a validation split,
        --val-ratio of the images are held out."""
        full = self.checked(size, self.o.max_bad_ratio, self.o.all_captions)
        if self.val is not None:
            return full, validation(self.val, size, self.o)
        keep, held = holdout(len(full.images), self.o.val_ratio, self.o.seed)
        return full.subset(keep), full.subset(held[:MAX_VAL_IMAGES], all_captions=False) if held else None


class Stream(Source):
    """A streamed HF data set: `train` is an IterableDataset (hub.load_stream)."""

    def examine(self, size: int):
        return None, []                 # a stream is read while training, not checked ahead

    def train_texts(self) -> list[str]:
        o = self.o
        return hub.stream_texts(self.train, self.name, STREAM_TEXTS, o.image_column, o.caption_column)

    def parts(self, size: int):
        o = self.o
        part = hub.StreamCaptions(self.train, self.name, o.steps_per_epoch * o.batch_size, size, o.image_column,
                                  o.caption_column, o.seed, o.shuffle_buffer, o.max_pixels, o.max_bad_ratio)
        return part, validation(self.val, size, o)


class ChatTable(Source):
    """Conversations read whole (conversations.py): `train` and `val` are Chats."""

    has_captions = False

    def train_texts(self) -> list[str]:
        return self.train.texts()

    def checked(self, chats, size: int, max_bad_ratio: float):
        """Samples with problems left out (named), every image decoded once, bad ones dropped."""
        conversations.report(chats, max_bad_ratio)
        o = self.o
        part = check_images(conversations.ChatSet(chats, size, o.seed, o.max_pixels), max_bad_ratio, o.workers)
        if not len(part):
            raise UserError(f"{chats.name} 里没有一条可用的样本。用 --check-data 查看问题。")
        return part

    def examine(self, size: int):
        """(training part, every problem) for --check-data: nothing is fatal."""
        o = self.o
        part = check_images(conversations.ChatSet(self.train, size, o.seed, o.max_pixels), 1.0, o.workers)
        return part, self.train.problems + (self.val.problems if self.val else []) + bad_lines(part)

    def parts(self, size: int):
        full = self.checked(self.train, size, self.o.max_bad_ratio)
        if self.val is not None:
            val = self.checked(self.val, size, 1.0)
            return full, val.take(range(min(len(val), MAX_VAL_IMAGES)))
        keep, held = holdout(len(full), self.o.val_ratio, self.o.seed)
        return full.take(keep), full.take(held[:MAX_VAL_IMAGES]) if held else None


def bad_lines(part) -> list[str]:
    return [f"{name}：{why}" for name, why in part.bad]


def validation(rows: Rows | None, size: int, o: Options) -> CaptionSet | None:
    """A validation split, checked (bad images skipped, never fatal), at most MAX_VAL_IMAGES."""
    if rows is None:
        return None
    checked = check_images(CaptionSet(rows, size, o.seed, False, o.max_pixels), 1.0, o.workers)
    return checked.subset(range(min(len(checked.images), MAX_VAL_IMAGES)))


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Format:
    """One kind of data: the --data-source naming it (local: --data-path, huggingface:
    --dataset-name), whether it takes a given name, and how to read it into a source."""
    source: str
    takes: Callable[[str, Options], bool]
    read: Callable[[str, Options, float], Source]


def read_folder(name: str, o: Options, weight: float) -> Table:
    return Table(name, folders.load_local(name), None, o, weight)


def read_chat_files(name: str, o: Options, weight: float) -> ChatTable:
    return ChatTable(name, conversations.load_files(name), None, o, weight)


def read_hf(name: str, o: Options, weight: float) -> Source:
    """A table with a conversation column (conversations.TURN_COLUMNS) is read as conversations,
    any other as captioned images."""
    train, val = opened = hub.open_split(name, o.split, False)
    if conversations.turn_column(train.features) is None:
        return Table(name, *hub.load_hf(name, o.split, o.image_column, o.caption_column, opened), o, weight)
    root = hub.copy_root(name)
    val = conversations.load_table(val, name, o.image_column, root) if val is not None and len(val) else None
    return ChatTable(name, conversations.load_table(train, name, o.image_column, root), val, o, weight)


def read_stream(name: str, o: Options, weight: float) -> Stream:
    opened = hub.open_split(name, o.split, True)
    if conversations.turn_column(opened[0].features) is not None:
        raise UserError(f"{name} 是对话数据，对话数据暂不支持 --streaming；请去掉 --streaming（会先下载到本机缓存）。")
    train, val = hub.load_stream(name, o.split, o.image_column, o.caption_column, MAX_VAL_IMAGES,
                                 max(1, o.eval_size), opened)
    return Stream(name, train, val, o, weight)


FORMATS = [                             # the first of a --data-source that takes a name reads it
    Format("local", lambda name, o: bool(conversations.chat_files(Path(name))), read_chat_files),   # LLaVA / messages
    Format("local", lambda name, o: True, read_folder),             # captions.json, metadata.jsonl/csv
    Format("huggingface", lambda name, o: o.streaming, read_stream),
    Format("huggingface", lambda name, o: True, read_hf),           # hub ids and local copies
]


def read(source: str, name: str, o: Options, weight: float = 1.0) -> Source:
    return next(f for f in FORMATS if f.source == source and f.takes(name, o)).read(name, o, weight)


def named(a) -> list[tuple[str, str, float]]:
    """[(data source, name, weight)] from --data-source / --data-path / --dataset-name."""
    paths = a.data_path or ([DEFAULT_LOCAL] if a.data_source == "local" else [])
    names = a.dataset_name or []
    if a.data_source == "huggingface" and not names:
        raise UserError("--data-source huggingface 需要 --dataset-name（例如 nlphuji/flickr30k）。")
    if not paths and not names:
        raise UserError("请指定训练数据：--data-source local --data-path 文件夹，或 --data-source huggingface "
                        "--dataset-name 数据集名。")
    if a.streaming and not names:
        raise UserError("--streaming 只用于 Hugging Face 数据集（--dataset-name）。")
    return ([("local",) + parse_source(s) for s in paths] +
            [("huggingface",) + parse_source(s) for s in names])


# ----------------------------------------------------------------------------- training data

@dataclass
class TrainingData:
    """What the trainer gets: the mixed training parts, the mixed validation parts (or None),
    and how many DataLoader workers have something to read."""
    train: Mixture
    val: Mixture | None
    workers: int

    def eval_items(self, count: int) -> list:
        """[(image, references)]: a fixed validation subset for caption metrics, taken evenly
        from every source."""
        items = []
        for r in range(count):
            for part in self.val.parts if self.val else []:
                if part.scores_captions and r < len(part) and len(items) < count:
                    items.append((part.image(r), part.references(r)))
        return items

    def runtime_bad(self) -> int:
        """Images that failed after the check (counted in this process)."""
        return sum(p.runtime_bad for p in self.train.parts)


@dataclass
class Limit:
    """The context a model gives a sample: its tokenizer, tokens per image and context length."""
    tok: object
    image_tokens: int
    max_len: int

    def fit(self, part):
        return part.fit(self.tok, self.image_tokens, self.max_len) if hasattr(part, "fit") else part


@dataclass
class Sources:
    """The sources of one training run, read (their images not yet decoded)."""
    sources: list
    o: Options

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def texts(self) -> list[str]:
        return [t for s in self.sources for t in s.texts()]

    def words(self) -> list[str]:
        """The words local folders list in tokenizer.WORDS_FILE: a tokenizer trained from scratch on
        this data makes each of them one token."""
        files = [Path(s.name) / WORDS_FILE for s in self.sources if Path(s.name).is_dir()]
        return [w.strip() for f in files if f.is_file() for w in f.read_text(encoding="utf-8").splitlines() if w.strip()]

    def training_data(self, size: int, limit: Limit | None = None) -> TrainingData:
        """The sources' parts, mixed; with a `limit`, parts that can (fit) leave out the samples
        the context cannot hold."""
        parts = [s.parts(size) for s in self.sources]
        if limit is not None:
            parts = [tuple(limit.fit(p) for p in pair) for pair in parts]
        train = Mixture([t for t, _ in parts], [s.weight for s in self.sources], self.o.seed)
        rank, world, _ = dist_env()
        if world > 1:                   # under torchrun a stream's rows are split here, before its shards are counted
            train.split_by_node(rank, world)
        val_parts = [v for _, v in parts if v is not None and len(v)]
        workers, shards = self.o.workers, train.shards()         # this rank's shards
        if shards is not None and workers > shards:     # datasets gives each worker whole shards; more would find none
            say(f"流式数据每个进程只有 {shards} 个分片，数据加载进程数从 {workers} 降为 {shards}。")
            workers = shards
        val = Mixture(val_parts, seed=self.o.seed) if val_parts else None
        print(f"训练样本 {len(train)} 条/轮" + (f"，验证图片 {len(val)} 张" if val else "，没有验证集"), flush=True)
        return TrainingData(train, val, workers)


def from_args(a, workers: int) -> Sources:
    """Read every source the flags name; `workers` threads check images later."""
    o = Options.from_args(a, workers=workers)
    return Sources([read(source, name, o, weight) for source, name, weight in named(a)], o)
