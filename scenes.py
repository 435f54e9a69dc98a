"""The built-in synthetic world: 1-3 coloured shapes on a 3x3 grid, captions and Q&A about them.

Every scene is a pure function of (seed, split, index), so data never needs to be stored.
Some (colour, shape) pairs never appear in the training split; the test split has a "seen"
part (no such pair) and a "heldout" part (at least one), which measures whether the model
composes colour and shape or just memorised pairs.

Export a folder usable by `train_vision_real.py --data-source local`:
    python scenes.py --out data/vision_train --count 1000
"""
from __future__ import annotations

import functools
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from errors import ArgumentParser, UserError, cli
from tokenizer import WORDS_FILE
from images import normalise

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形", "cross": "十字形"}
COLOURS = {"red": (220, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 220),
           "yellow": (235, 200, 25), "purple": (145, 55, 190), "orange": (245, 135, 25)}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
POSITIONS_ZH = ["左上方", "正上方", "右上方", "左侧", "中间", "右侧", "左下方", "正下方", "右下方"]
COUNT_ZH = {1: "一", 2: "两", 3: "三"}
COUNT_EN = {1: "one", 2: "two", 3: "three"}
# drawn only by --reshape (SceneDataset), and never named: the world has no word for them
NAMELESS = ["ring", "star", "hexagon", "half-disc"]
# never in training: each shape misses one colour, each of five colours misses one shape
HELDOUT = {("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "cross"),
           ("purple", "square")}

CAPTION_PROMPTS = {
    "zh": ["描述这张图片", "图里有什么？", "请描述图中的内容。", "这张图片里有哪些形状？", "详细描述一下这幅图。"],
    "en": ["Describe this image.", "What is in the picture?", "Describe the shapes in this image.",
           "What do you see?"],
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int                  # 0..8, row-major


def make_scene(seed: int, split: str, index: int):
    """(objects sorted by cell, rng for rendering). split: train | test | heldout."""
    rng = random.Random(f"{seed}/{split}/{index}")
    n = rng.choice([1, 2, 3])
    cells = sorted(rng.sample(range(9), n))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    seen = [p for p in pairs if p not in HELDOUT]
    chosen = [rng.choice(seen) for _ in cells]
    if split == "heldout":
        chosen[rng.randrange(n)] = rng.choice(sorted(HELDOUT))
    elif split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}")
    return [Obj(s, c, cell) for cell, (c, s) in zip(cells, chosen)], rng


def render(objs, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw at 4x and downsample, for smooth edges. Sizes, offsets, tints and background vary."""
    S = size * 4
    base = rng.randint(190, 240)
    bg = tuple(base + rng.randint(-12, 12) for _ in range(3))      # light, mildly tinted
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    cell = S / 3
    for o in objs:
        r = cell * rng.uniform(0.28, 0.42)                       # half-size of the shape
        slack = cell / 2 - r
        cx = (o.cell % 3 + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (o.cell // 3 + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        col = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[o.colour])
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif o.shape == "square":
            q = r * 0.9
            d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=col)
        elif o.shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r * 1.1, cy + r * 0.85), (cx - r * 1.1, cy + r * 0.85)], fill=col)
        elif o.shape == "diamond":
            d.polygon([(cx, cy - r * 1.15), (cx + r, cy), (cx, cy + r * 1.15), (cx - r, cy)], fill=col)
        elif o.shape == "cross":
            w = r * 0.36
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
        elif o.shape == "ring":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(2, int(r * 0.4)))
        elif o.shape == "star":
            d.polygon([(cx + r * (1 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                        cy - r * (1 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)], fill=col)
        elif o.shape == "hexagon":
            d.polygon([(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)], fill=col)
        elif o.shape == "half-disc":
            d.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=col)
    return img.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


# ----------------------------------------------------------------------------- language

def name(o: Obj, lang: str) -> str:
    if lang == "zh":
        return f"{COLOURS_ZH[o.colour]}的{SHAPES_ZH[o.shape]}"
    return f"{o.colour} {o.shape}"


def with_article(words: str) -> str:
    """English indefinite article: "an orange circle", "a red square"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(objs, lang: str = "zh") -> str:
    if lang == "zh":
        parts = [f"{POSITIONS_ZH[o.cell]}是一个{name(o, lang)}" for o in objs]
        return f"图中有{COUNT_ZH[len(objs)]}个形状：" + "，".join(parts) + "。"
    parts = [f"{with_article(name(o, lang))} at the {POSITIONS[o.cell]}" for o in objs]
    head = "There is one shape: " if len(objs) == 1 else f"There are {COUNT_EN[len(objs)]} shapes: "
    return head + (", and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else parts[0]) + "."


def questions(objs, lang: str = "zh"):
    """Every question this scene can answer, as (kind, question, answer, about_something):
    the last is False when the answer is "there is none" (an empty cell, an absent shape)."""
    by_cell = {o.cell: o for o in objs}
    zh = lang == "zh"
    out = [("count", "图中有几个形状？" if zh else "How many shapes are there?",
            f"{COUNT_ZH[len(objs)]}个。" if zh else f"{COUNT_EN[len(objs)].capitalize()}.", True)]
    for s in SHAPES:
        matches = [o for o in objs if o.shape == s]
        if len(matches) > 1:
            continue
        q = f"{SHAPES_ZH[s]}是什么颜色的？" if zh else f"What color is the {s}?"
        if matches:
            c = matches[0].colour
            a = f"{COLOURS_ZH[c]}。" if zh else f"{c.capitalize()}."
        else:
            a = f"图中没有{SHAPES_ZH[s]}。" if zh else f"There is no {s}."
        out.append(("colour", q, a, bool(matches)))
    for cell in range(9):
        o = by_cell.get(cell)
        pz, pe = POSITIONS_ZH[cell], POSITIONS[cell]
        none = f"{pz}没有形状。" if zh else f"There is nothing at the {pe}."
        out.append(("shape", f"{pz}是什么形状？" if zh else f"What shape is at the {pe}?",
                    (f"{SHAPES_ZH[o.shape]}。" if zh else f"{with_article(o.shape).capitalize()}.") if o else none, o is not None))
        out.append(("object", f"{pz}有什么？" if zh else f"What is at the {pe}?",
                    (f"一个{name(o, lang)}。" if zh else f"{with_article(name(o, lang)).capitalize()}.") if o else none, o is not None))
    return out


def colour_at(objs, lang: str = "zh"):
    """"What colour is at <cell>?" for every cell, as questions() gives them: for shapes of no name."""
    by_cell, zh = {o.cell: o for o in objs}, lang == "zh"
    out = []
    for cell, (pz, pe) in enumerate(zip(POSITIONS_ZH, POSITIONS)):
        o = by_cell.get(cell)
        a = (f"{COLOURS_ZH[o.colour]}。" if zh else f"{o.colour.capitalize()}.") if o else \
            (f"{pz}没有形状。" if zh else f"There is nothing at the {pe}.")
        out.append(("colour_at", f"{pz}是什么颜色的？" if zh else f"What color is the shape at the {pe}?", a, o is not None))
    return out


def parse_caption(text: str, lang: str = "zh"):
    """The set of (cell, colour, shape) a caption names; unreadable parts are ignored."""
    found = set()
    if lang == "zh":
        for cell, p in enumerate(POSITIONS_ZH):
            for c, cz in COLOURS_ZH.items():
                for s, sz in SHAPES_ZH.items():
                    if f"{p}是一个{cz}的{sz}" in text:
                        found.add((cell, c, s))
        return found
    for cell, p in enumerate(POSITIONS):
        for c in COLOURS:
            for s in SHAPES:
                said = f"{with_article(f'{c} {s}')} at the {p}"
                if said + "," in text + "," or said + "." in text:
                    found.add((cell, c, s))
    return found


# ----------------------------------------------------------------------------- data set

class SceneDataset(torch.utils.data.Dataset):
    """Map-style: item i is scene i of the split as a conversation of 1-3 turns (the caption
    and/or questions, in random order), drawn afresh each epoch. Several turns per image share
    one pass of the vision encoder and the image tokens, so each step teaches more. Items carry
    per-cell labels for the encoder's auxiliary probe. Rates that only training sets use:
    hide: answer tokens fed as <pad> (collate.py). recolour: the picture with its colour channels
    swapped (far_from_heldout: the same shapes in colours of no name), asking only the count and
    shapes. reshape: (of the other items) the objects drawn as shapes of no name (NAMELESS) in
    their own colours, asking only the count and colour_at. So the language model, not only the
    probe, learns to read a shape whatever its colour and a colour whatever its shape: a pair never
    seen is otherwise misread as a seen neighbour (docs/training.md).
    A scene's picture is the same every epoch (only its questions change), so the pictures are
    drawn once, up front, and kept, up to CACHE_BYTES: drawing them every epoch was 8% of a demo
    step on a 2-core CPU, and drawn during the first epoch they would make its pace (the printed
    estimate of the training time) slower than the later epochs'. The scene's objects, the channel
    orders it may be recoloured with and its probe labels are kept with the picture for the same
    reason (and each scene's questions, by pick_questions)."""

    epoch_keys = True                                           # items are keyed (epoch, index)
    CACHE_BYTES = 1 << 30

    def __init__(self, size: int, split: str = "train", seed: int = 0, lang: str = "zh",
                 image_size: int = 64, max_turns: int = 3, hide: float = 0.0, recolour: float = 0.0,
                 reshape: float = 0.0):
        self.size, self.split, self.seed, self.lang = size, split, seed, lang
        self.image_size, self.max_turns, self.hide = image_size, max_turns, hide
        self.recolour, self.reshape = recolour, reshape
        self.kept = {i: self.scene(i) for i in range(min(size, self.CACHE_BYTES // (3 * image_size ** 2)))}

    def __len__(self):
        return self.size

    def scene(self, i: int):
        """(picture, objects, the PERMS it may be recoloured with, its probe labels): the same every epoch."""
        objs, rng = make_scene(self.seed, self.split, i)
        return render(objs, rng, self.image_size), objs, far_from_heldout(objs), cell_labels(objs)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image, objs, perms, cells = self.kept[i] if i in self.kept else self.scene(i)
        task = random.Random(f"{self.seed}/{self.split}/{i}/task/{epoch}")
        turns = [(task.choice(CAPTION_PROMPTS[self.lang]), caption(objs, self.lang))]
        turns += pick_questions(objs, task, self.lang, 3)
        chosen = task.sample(turns, task.randint(1, self.max_turns))
        probe_order = task.choice(perms) if perms else (0, 1, 2)    # CellProbe's second look at the scene
        cells = cells.clone()
        swap = random.Random(f"{self.seed}/{self.split}/{i}/recolour/{epoch}")
        if self.recolour and swap.random() < self.recolour and perms:   # the same shapes in colours of no name:
            order, bands = swap.choice(perms), image.split()        # only what does not name a colour is asked
            image = Image.merge("RGB", [bands[c] for c in order])
            probe_order = tuple(order.index(c) for c in probe_order)    # still relative to the scene's colours
            chosen = pick_questions(objs, swap, self.lang, swap.randint(1, self.max_turns), kinds=("count", "shape"))
            cells[1] = IGNORE                                       # and the probe learns no colour from it
        elif self.reshape and swap.random() < self.reshape:         # shapes of no name in the same colours:
            drawn = [Obj(swap.choice(NAMELESS), o.colour, o.cell) for o in objs]   # only colours are asked
            image = render(drawn, make_scene(self.seed, self.split, i)[1], self.image_size)   # the picture's own places
            chosen = pick_questions(objs, swap, self.lang, swap.randint(1, self.max_turns), kinds=("count", "colour_at"))
            cells[0][cells[0] > 0] = IGNORE                         # and the probe learns no shape from it
        messages = []
        for q, a in chosen:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        item = {"image": image, "messages": messages, "cells": cells, "recolour": torch.tensor(probe_order)}
        return {**item, "hide": self.hide} if self.hide else item


# "What colour is the X?" is the one question that needs a search by content (find the X
# wherever it is); the others name a cell or the whole image. Asked twice as often, the 7-epoch
# demo answers it right 98% instead of 71% (all questions: 98.0% instead of 91.5%, docs/training.md).
# "colour_at" is asked only about shapes that have no name (--reshape), beside the count.
KIND_WEIGHTS = {"count": 1, "colour": 2, "shape": 1, "object": 1, "colour_at": 4}
ASKED = ("count", "colour", "shape", "object")                 # the kinds an ordinary item asks


def pick_questions(objs, rng: random.Random, lang: str, k: int, kinds=ASKED):
    """k different questions of the given kinds, balanced: each kind drawn by KIND_WEIGHTS, and within
    a kind questions about something present as likely as "is there anything at X?" with the answer no
    (most cells are empty, so uniform sampling would teach the model to answer "nothing")."""
    drawn, weights, groups = grouped_questions(tuple(objs), lang, tuple(kinds))
    picked = []
    while len(picked) < k:
        by_answer = groups[rng.choices(drawn, weights)[0]]
        qa = rng.choice(by_answer[rng.choice(sorted(by_answer))])
        if qa not in picked:
            picked.append(qa)
    return picked


@functools.lru_cache(maxsize=1 << 15)
def grouped_questions(objs: tuple, lang: str, kinds: tuple):
    """pick_questions' questions of a scene by kind and by whether they are about something present,
    the kinds and their weights: the same every epoch, so kept (read only)."""
    groups = {}
    for kind, q, a, present in questions(objs, lang) + (colour_at(objs, lang) if "colour_at" in kinds else []):
        if kind in kinds:
            groups.setdefault(kind, {}).setdefault(present, []).append((q, a))
    drawn = sorted(groups)
    return drawn, [KIND_WEIGHTS[kind] for kind in drawn], groups


IGNORE = -100                  # a cell label the probe skips (cross_entropy's ignore_index)


def cell_labels(objs) -> torch.Tensor:
    """(2, 9): row 0 shape index+1 per cell, row 1 colour index+1 per cell, 0 = empty."""
    t = torch.zeros(2, 9, dtype=torch.long)
    colours = list(COLOURS)
    for o in objs:
        t[0, o.cell] = SHAPES.index(o.shape) + 1
        t[1, o.cell] = colours.index(o.colour) + 1
    return t


PERMS = [(1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0), (2, 0, 1)]     # every order of R, G, B but the identity
NEAR = 80          # RGB distance; yellow and orange, the closest two colours of the world, are 66 apart


def far_from_heldout(objs) -> list:
    """The PERMS that draw no object of the scene within NEAR of the colour of a held-out pair of its
    shape: swapped, a blue triangle (35, 75, 220) would be a (220, 75, 35) one, a red triangle's
    neighbour (red triangles are held out), and the model would have seen that pair after all."""
    return [p for p in PERMS if all(math.dist([COLOURS[o.colour][c] for c in p], COLOURS[h]) >= NEAR
                                    for o in objs for h, s in HELDOUT if s == o.shape)]


def words(lang: str = "zh"):
    """The Chinese words of the world that may each be one token: colour, shape and position names
    and the captions' fixed phrases. A colour and a shape stay two tokens, so an unseen pair is
    two known tokens side by side."""
    if lang != "zh":
        return []
    return [*COLOURS_ZH.values(), *SHAPES_ZH.values(), *POSITIONS_ZH, "是一个", "图中", "没有", "形状", "什么", "颜色", "描述"]


def all_texts(lang: str = "zh"):
    """Every sentence the world can produce, for training the demo tokenizer."""
    rng = random.Random(0)
    texts = list(CAPTION_PROMPTS[lang])
    for i in range(3000):
        objs, _ = make_scene(0, "heldout" if i % 3 == 0 else "train", i)
        texts.append(caption(objs, lang))
        texts += [q + a for _, q, a, _ in questions(objs, lang)]
    rng.shuffle(texts)
    return texts


# ----------------------------------------------------------------------------- export

MARKER = ".scenes"          # written beside captions.json: this folder's data came from export()


def write_words(out: Path, lang: str):
    """words() as the folder's words file: train_vision_real.py's tokenizer then spells a colour or
    a shape as one token, as the demo's does."""
    (out / WORDS_FILE).write_text("".join(w + "\n" for w in words(lang)), encoding="utf-8")


def check_out(out: Path, overwrite: bool):
    """Never replace a user's own captions.json: only one that export() wrote, or with --overwrite."""
    if (out / "captions.json").exists() and not (out / MARKER).exists() and not overwrite:
        raise UserError(f"{out} 里已有 captions.json，而且不是 scenes.py 生成的（可能是你自己的数据），没有覆盖。"
                        f"请用 --out 指定别的文件夹，或确认要替换时加 --overwrite。")


def export(out: Path, count: int, split: str = "train", seed: int = 0, lang: str = "zh", size: int = 72):
    """Write images/, captions.json ({file: caption}) and metadata.jsonl (objects + Q&A)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("scenes.py\n", encoding="utf-8")
    write_words(out, lang)
    captions, meta = {}, []
    for i in range(count):
        objs, rng = make_scene(seed, split, i)
        fname = f"scene_{split}_{i:06d}.png"
        render(objs, rng, size).save(out / "images" / fname)
        captions[fname] = caption(objs, lang)
        meta.append({"file_name": f"images/{fname}", "caption": captions[fname],
                     "objects": [{"shape": o.shape, "shape_zh": SHAPES_ZH[o.shape], "colour": o.colour,
                                  "colour_zh": COLOURS_ZH[o.colour], "position": POSITIONS[o.cell],
                                  "position_zh": POSITIONS_ZH[o.cell]} for o in objs],
                     "qa": [{"question": q, "answer": a} for _, q, a, _ in questions(objs, lang)]})
    (out / "captions.json").write_text(json.dumps(captions, ensure_ascii=False, indent=1), encoding="utf-8")
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for m in meta:
            f.write(json.dumps(m, ensure_ascii=False) + "\n")


@cli
def main(argv=None):
    p = ArgumentParser(description="导出合成场景为本地数据文件夹（images/ + captions.json + metadata.jsonl）")
    p.add_argument("--out", default="data/vision_train", help="输出文件夹（默认 data/vision_train）")
    p.add_argument("--count", type=int, default=1000, help="场景数量（默认 1000）")
    p.add_argument("--split", default="train", choices=["train", "test", "heldout"],
                   help="train=训练集；test=测试集（已见组合）；heldout=含训练中从未出现的颜色+形状组合")
    p.add_argument("--seed", type=int, default=0, help="随机种子（默认 0）")
    p.add_argument("--lang", default="zh", choices=["zh", "en"], help="描述语言（默认 zh）")
    p.add_argument("--size", type=int, default=72, help="图片边长（像素，默认 72，与演示模型一致）")
    p.add_argument("--overwrite", action="store_true", help="允许替换文件夹里不是 scenes.py 生成的 captions.json")
    p.add_argument("--format", default="captions", choices=["captions", "llava"],
                   help="captions=图片描述（captions.json）；llava=LLaVA 对话格式（conversations.json：每张图多轮问答，"
                        "另有两图问题；text/ 里是纯文字样本，训练时用 --data-path 文件夹/text:权重 混入，见 scene_chats.py）（默认 captions）")
    a = p.parse_args(argv)
    if a.count <= 0 or a.size < 16:
        p.exit(2, "错误：--count 必须为正数，--size 至少为 16。\n")
    if a.format == "llava":
        import scene_chats
        samples, texts = scene_chats.export(Path(a.out), a.count, a.split, a.seed, a.lang, a.size)
        print(f"已写入 {a.count} 个场景、{len(samples)} 条对话样本到 {a.out}（images/、conversations.json），"
              f"另有 {len(texts)} 条纯文字样本在 {a.out}/text/")
        return
    check_out(Path(a.out), a.overwrite)
    export(Path(a.out), a.count, a.split, a.seed, a.lang, a.size)
    print(f"已写入 {a.count} 个场景到 {a.out}（images/、captions.json、metadata.jsonl）")


if __name__ == "__main__":
    sys.exit(main())
