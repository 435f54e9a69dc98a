"""Local folders of images with captions, the two layouts docs/datasets.md describes:

    captions.json   {"a.jpg": "caption" | ["c1", "c2"]} or [{"image": ..., "caption": ...}],
                    images in images/ or beside it
    metadata.jsonl / metadata.csv   the imagefolder convention: file_name + caption columns
Both become one Rows (captions.py). A path that leaves the folder is refused, never read.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from captions import ImageRef, Rows, caption_columns, caption_list, inside
from errors import UserError
from images import BadImage


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


def captions_json(root: Path):
    """(entries [(relative path, caption value)], locate) of a captions.json folder."""
    f = root / "captions.json"
    obj = parse_json(f, read_text(f))
    if isinstance(obj, dict):
        entries = list(obj.items())
    elif isinstance(obj, list) and all(isinstance(o, dict) for o in obj):
        entries = []
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
    return entries, locate


def metadata(root: Path):
    """(entries, locate) of an imagefolder: metadata.jsonl or metadata.csv with file_name."""
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
    caps = caption_columns(cols)
    if not caps:
        raise UserError(f"{f} 里找不到描述列（如 caption、text）；有：{', '.join(cols)}。")
    entries = []
    for r in records:
        value = [r.get(c) for c in caps]
        if f.suffix == ".csv":                 # a csv cell may hold a JSON list of captions
            value = [json.loads(v) if isinstance(v, str) and v.startswith("[") and _is_json(v) else v
                     for v in value]
        entries.append((str(r.get("file_name") or ""), value))
    return entries, lambda rel: inside(root, rel)


# layout file -> its reader, tried in this order
LAYOUTS = {"captions.json": captions_json, "metadata.jsonl": metadata, "metadata.csv": metadata}


def load_local(path: str) -> Rows:
    """A folder in one of LAYOUTS -> Rows of its images with non-empty captions."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"找不到本地数据文件夹 {root}。请按 docs/datasets.md 准备 images/ 和 captions.json。")
    layout = next((read for file, read in LAYOUTS.items() if (root / file).is_file()), None)
    if layout is None:
        raise UserError(f"{root} 里既没有 captions.json，也没有 metadata.jsonl / metadata.csv。格式见 docs/datasets.md。")
    entries, locate = layout(root)
    rows = Rows(name=str(root), refs=[], captions=[], names=[])
    for rel, value in entries:
        caps = caption_list(value)
        if not caps:
            rows.empty_captions += 1
            continue
        try:
            ref = ImageRef(path=str(locate(rel)))
        except BadImage as e:
            ref = ImageRef(refused=str(e))
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
