"""Conversation data: LLaVA JSON, messages JSONL, and the same as columns of a Hugging Face data set.

    LLaVA      [{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}]
    messages   {"id"?, "messages": [{"role": "user"|"assistant"|"system", "content"}], "images": [paths]}
    HF table   a `conversations` or `messages` column (+ `images` or `image`: Image, [Image], path, [paths])
      -> one record per sample: id, image values, turns (record)
      -> checked: roles, <image> count against the images, empty or missing answers, missing
         files; a sample with a problem is left out and the problem kept with its id (Chats.problems)
      -> Chats: Rows of every image used (lazy ImageRefs, images.py decodes) + per sample its images
      -> ChatSet: item {"images": [PIL], "messages": [...], "id"}, what collate.Collator takes
Text-only samples ("images": []) are fine and mix with the rest. System turns stay in the
messages: an HF chat template renders them, the built-in template has no place for them.
Whitespace right after an <image> (LLaVA writes "<image>\n") is dropped on load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captions import ImageRef, Rows, first_readable, inside, log
from errors import UserError
from folders import parse_json, read_text
from images import MAX_PIXELS, BadImage, ImagePolicy, decode
from tokenizer import IMAGE, kept_length

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_COLUMNS = ("conversations", "messages")     # an HF table with one of these holds conversations
IMAGE_COLUMNS = ("images", "image")
AFTER_IMAGE = re.compile(re.escape(IMAGE) + r"\s+")   # LLaVA's "<image>\n": serving sends no newline
SHOWN = 5                                         # problems named in one line; --check-data lists all


@dataclass
class Chats:
    """What a reader found: the good samples (their images in `rows`) and every problem."""
    name: str
    rows: Rows
    ids: list = field(default_factory=list)
    images: list = field(default_factory=list)   # per sample: positions in rows.refs
    messages: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # "样本 id：why" per left-out sample
    total: int = 0                                # samples read, good or not

    def texts(self) -> list[str]:
        return [m["content"].replace(IMAGE, " ").strip() for ms in self.messages for m in ms]


def record_parts(rec, n: int, prefix: str = ""):
    """(id, image values, raw turns, problem or None) of one raw record."""
    if not isinstance(rec, dict):
        return f"{prefix}{n}", [], [], f"第 {n + 1} 条不是 JSON 对象"
    sid = prefix + str(rec.get("id", n))
    turns = next((rec[k] for k in TURN_COLUMNS if k in rec), None)
    value = next((rec[k] for k in IMAGE_COLUMNS if rec.get(k) not in (None, "")), [])
    values = value if isinstance(value, list) else [value]
    return sid, values, turns, None if isinstance(turns, list) else "没有 conversations / messages 列表"


def messages_of(turns) -> tuple[list, str | None]:
    """Raw turns ({"from","value"} or {"role","content"}) -> (messages, problem or None)."""
    out = []
    for k, t in enumerate(turns, 1):
        role = t.get("from", t.get("role")) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role not in ROLES:
            return out, f"第 {k} 轮的角色 {role!r} 不认识（只认 human/gpt、user/assistant、system）"
        if not isinstance(text, str):
            return out, f"第 {k} 轮的内容不是文字"
        if ROLES[role] == "assistant" and not text.strip():
            return out, f"第 {k} 轮是空回答"
        if ROLES[role] != "user" and IMAGE in text:
            return out, f"第 {k} 轮（{role}）里有 {IMAGE}：占位符只能写在用户轮里"
        out.append({"role": ROLES[role], "content": AFTER_IMAGE.sub(IMAGE, text)})
    if not any(m["role"] == "assistant" for m in out):
        return out, "没有回答轮（gpt / assistant），没有可训练的内容"
    return out, None


def placeholder_problem(messages, n_images: int) -> str | None:
    marked = sum(m["content"].count(IMAGE) for m in messages if m["role"] == "user")
    if marked and marked != n_images:
        return f"有 {marked} 个 {IMAGE} 占位符，却有 {n_images} 张图片"
    return None


def collect(chats: Chats, records, locate, prefix: str = "") -> Chats:
    """Records -> the samples and problems of `chats`. locate(record number, image value, its
    place in the sample) gives an ImageRef or raises BadImage; refs of one file are shared."""
    rows, seen = chats.rows, {r.path: i for i, r in enumerate(chats.rows.refs) if r.path}
    for n, rec in enumerate(records):
        chats.total += 1
        sid, values, turns, why = record_parts(rec, n, prefix)
        messages, why = messages_of(turns) if why is None else ([], why)
        why = why or placeholder_problem(messages, len(values))
        try:
            refs = [locate(n, v, k) for k, v in enumerate(values)] if why is None else []
        except BadImage as e:
            why = str(e)
        if why is not None:
            chats.problems.append(f"样本 {sid}：{why}")
            continue
        places = []
        for k, ref in enumerate(refs):
            key = ref.path or (ref.row, ref.item)
            if key not in seen:
                seen[key] = len(rows.refs)
                rows.refs.append(ref)
                rows.names.append(f"样本 {sid} 的第 {k + 1} 张图片")
                rows.captions.append([])
            places.append(seen[key])
        chats.ids.append(sid)
        chats.images.append(places)
        chats.messages.append(messages)
    return chats


# ----------------------------------------------------------------------------- files

def chat_files(path: Path) -> list[Path]:
    """The conversation files a --data-path names: itself (a .json / .jsonl file), or the
    top-level ones of a folder without a captions layout."""
    if path.is_file():
        return [path] if path.suffix in (".json", ".jsonl") else []
    if not path.is_dir() or any((path / f).is_file() for f in ("captions.json", "metadata.jsonl", "metadata.csv")):
        return []
    return sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.name != "dataset_info.json")


def file_records(f: Path) -> list:
    text = read_text(f)
    if f.suffix == ".jsonl":
        return [parse_json(f, line, n) for n, line in enumerate(text.splitlines()) if line.strip()]
    obj = parse_json(f, text)
    if not isinstance(obj, list):
        raise UserError(f"{f} 不是对话数据：应为 [{{\"conversations\": [...]}}, ...] 列表（LLaVA），或每行一个 "
                        f"{{\"messages\": [...]}} 的 .jsonl；图片描述请用带 captions.json 的文件夹。格式见 docs/datasets.md。")
    return obj


def load_files(path: str) -> Chats:
    """A conversation file or folder -> Chats. Image paths are relative to the file's folder
    (or its images/ folder) and may not leave it. With several files, ids start "file#"."""
    files = chat_files(Path(path))
    if not files:
        raise UserError(f"{path} 里没有对话数据文件（.json / .jsonl）。格式见 docs/datasets.md。")
    chats = Chats(path, Rows(name=path, refs=[], captions=[], names=[]))
    for f in files:
        root = f.parent
        base = root / "images" if (root / "images").is_dir() else root

        def locate(n, value, k, root=root, base=base):
            if not isinstance(value, str):
                raise BadImage(f"第 {k + 1} 张图片不是路径")
            p = inside(root, value)
            p = p if p.exists() else inside(base, value)
            if not p.is_file():
                raise BadImage(f"找不到图片 {value}")
            return ImageRef(path=str(p))
        collect(chats, file_records(f), locate, f"{f.name}#" if len(files) > 1 else "")
    return chats


# ----------------------------------------------------------------------------- HF tables

def turn_column(features) -> str | None:
    return next((c for c in TURN_COLUMNS if c in (features or {})), None)


def image_column(features, chosen: str | None) -> str | None:
    if chosen:
        if chosen not in features:
            raise UserError(f"没有列 {chosen!r}（有：{', '.join(features)}）。")
        return chosen
    return next((c for c in IMAGE_COLUMNS if c in features), None)


def undecoded(ds, col: str):
    """The image column alone, Image cells (single or in a list) left as bytes."""
    from datasets import Image as HFImage, List
    ds = ds.select_columns([col])
    f = ds.features[col]
    if isinstance(f, HFImage):
        return ds.cast_column(col, HFImage(decode=False))
    if isinstance(getattr(f, "feature", None), HFImage):
        return ds.cast_column(col, List(HFImage(decode=False)))
    return ds


def image_counts(table, col: str) -> list[int]:
    """Images per row of an image column (a list per row, or one or none), without reading them."""
    import pyarrow.compute as pc
    data = table.data.column(col)
    listed = hasattr(table.features[col], "feature")
    return (pc.list_value_length(data).fill_null(0) if listed else pc.cast(pc.is_valid(data), "int64")).to_pylist()


def load_table(ds, name: str, chosen_image: str | None = None, root: Path | None = None) -> Chats:
    """An HF Dataset with a conversation column -> Chats (images stay in the table)."""
    turns, img = turn_column(ds.features), image_column(ds.features, chosen_image)
    values = ds.select_columns([turns] + (["id"] if "id" in ds.features else [])).to_dict()
    table = undecoded(ds, img) if img else None
    counts = image_counts(table, img) if img else [0] * len(ds)
    ids = values.get("id") or [f"{name}#{r}" for r in range(len(ds))]
    records = [{"id": ids[r], turns: values[turns][r], "images": [None] * counts[r]} for r in range(len(ds))]
    listed = img is not None and hasattr(table.features[img], "feature")
    chats = Chats(name, Rows(name=name, refs=[], captions=[], names=[], table=table, root=root))
    return collect(chats, records, lambda n, value, k: ImageRef(row=n, item=k if listed else None))


# ----------------------------------------------------------------------------- data set

class ChatSet(torch.utils.data.Dataset):
    """Map-style, keyed (epoch, index): sample k with its images decoded. A sample whose image
    fails at run time is replaced by the next good one. check_images takes it like a CaptionSet
    (rows, images, load, subset)."""

    epoch_keys = True
    scores_captions = False

    def __init__(self, chats: Chats, image_size: int, seed: int = 0, max_pixels: int = MAX_PIXELS, keep=None):
        self.chats, self.rows, self.image_size, self.seed, self.max_pixels = chats, chats.rows, image_size, seed, max_pixels
        self.samples = list(range(len(chats.ids))) if keep is None else list(keep)
        self.images = sorted({i for s in self.samples for i in chats.images[s]})
        self.runtime_bad, self.bad, self.too_long = 0, [], []

    def __len__(self):
        return len(self.samples)

    def load(self, i: int):
        return decode(self.rows.source(self.rows.refs[i]), self.image_size, ImagePolicy(self.max_pixels))

    def take(self, positions) -> "ChatSet":
        return ChatSet(self.chats, self.image_size, self.seed, self.max_pixels, [self.samples[p] for p in positions])

    def subset(self, positions) -> "ChatSet":
        """The samples all of whose images are among these (positions into self.images)."""
        good = {self.images[p] for p in positions}
        return self.take([p for p, s in enumerate(self.samples) if all(i in good for i in self.chats.images[s])])

    def chat(self, k: int) -> tuple[str, int, list]:
        """(id, number of images, messages) of sample k, no image decoded."""
        s = self.samples[k]
        return self.chats.ids[s], len(self.chats.images[s]), self.chats.messages[s]

    def fit(self, tok, image_tokens: int, max_len: int) -> "ChatSet":
        """Leave out (and count, in too_long) the samples a context of max_len cannot train on."""
        measured = measure(self, tok, image_tokens, max_len)
        fitted = self.take([k for k, (_, _, _, why) in enumerate(measured) if why is None])
        fitted.bad, fitted.too_long = self.bad, [f"样本 {sid}：{why}" for sid, _, _, why in measured if why]
        if fitted.too_long:
            log(f"{self.chats.name}：{len(fitted.too_long)} 条样本无法训练，已跳过：{'；'.join(fitted.too_long[:SHOWN])}"
                f"{'等' if len(fitted.too_long) > SHOWN else ''}。")
        return fitted

    def __getitem__(self, key):
        epoch, k = key if isinstance(key, tuple) else (0, key)
        chats = self.chats
        p, images = first_readable(self, k, len(self.samples),
                                   lambda p: [self.load(i) for i in chats.images[self.samples[p]]],
                                   lambda p: f"样本 {chats.ids[self.samples[p]]}",
                                   f"数据集 {chats.name} 里没有一条图片都能读取的样本。")
        s = self.samples[p]
        return {"images": images, "messages": chats.messages[s], "id": chats.ids[s]}


def measure(part, tok, image_tokens: int, max_len: int) -> list[tuple]:
    """[(id, tokens, supervised tokens, why it cannot be trained on or None)] for every sample
    of a part that gives chat(k), no image decoded. The rule is tokenizer.kept_length."""
    out = []
    for k in range(len(part)):
        sid, n, messages = part.chat(k)
        try:
            ids, labels = tok.encode_chat(messages, image_tokens, n)
        except ValueError as e:
            out.append((sid, 0, 0, f"无法按对话模板编码（{e}）"))
            continue
        supervised = sum(label != -100 for label in labels)
        why = None
        if kept_length(ids, labels, tok.image_id, max_len) is None:
            why = ("没有要训练的 token" if not supervised else
                   f"{len(ids)} 个 token 超出上下文 {max_len}，截断会切到图片 token 或切掉全部回答")
        out.append((sid, len(ids), supervised, why))
    return out


def report(chats: Chats, max_bad_ratio: float):
    """One line about left-out samples; above max_bad_ratio the run does not start."""
    if not chats.problems:
        return
    share = len(chats.problems) / max(1, chats.total)
    named = "；".join(chats.problems[:SHOWN]) + ("等" if len(chats.problems) > SHOWN else "")
    if share > max_bad_ratio:
        raise UserError(f"{chats.name} 中 {len(chats.problems)}/{chats.total} 条样本有问题（{share:.1%}，超过 "
                        f"--max-bad-ratio {max_bad_ratio:.0%}），训练未开始：{named}。用 --check-data 查看全部问题。")
    log(f"{chats.name}：跳过 {len(chats.problems)}/{chats.total} 条有问题的样本（{share:.1%}）：{named}")
