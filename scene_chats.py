"""The synthetic scenes as LLaVA conversation data, and two-image questions to score a checkpoint on.

    python scenes.py --format llava --out data/scene_chats --count 4210
writes images/, conversations.json and text/conversations.json (docs/datasets.md, LLaVA JSON):
  - one sample per scene: the caption question and QUESTIONS questions about it, in random order;
  - every PAIR_EVERY-th scene also starts a two-image sample with the next scene (the template names
    the pictures 图1：, 图2： in front of them, tokenizer.images_first): "哪张图里有红色的圆形？"
    answered by describing picture 1, saying whether it has the thing, describing picture 2, then
    "所以是第二张。" (the thing is in exactly one of them); and how many shapes each of the two
    has; the three questions in random order (a fixed order lets the model answer by turn number
    without reading the question);
  - in text/, TEXT_PER_SCENE text-only samples per scene, each on two fresh scenes never rendered:
    the same question with picture 1's description given, answered "图1里有/没有红色的圆形。",
    then more such questions. Mixed in with a weight (--data-path data/scene_chats/text:0.058),
    each epoch draws other ones: a fixed set is learnt by heart instead (docs/datasets.md).
A checkpoint trained on it by train_vision_real.py is scored by evaluate.py: the usual QA on
unseen scenes, and with --pairs the two-image questions on fresh scene pairs (chance: 50% for
which picture, 1/3 for a picture's count).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import scenes
from errors import UserError
from tokenizer import IMAGE

QUESTIONS = 6                  # questions per scene besides the caption
PAIR_EVERY = 2                 # a two-image sample for every 2nd scene
TEXT_PER_SCENE = 10            # text-only which-picture samples (two fresh, unrendered scenes each) per scene
TEXT_QUESTIONS = 3             # which-picture questions per text-only sample
CHANCE = 0.5                   # two pictures: guessing is right half the time
ORDINAL = {"zh": ("第一张", "第二张"), "en": ("first", "second")}


def exclusive(a, b, rng: random.Random, lang: str) -> list[tuple[str, int]]:
    """Every (thing, picture) with a thing (a colour and a shape) found in exactly one of two
    scenes, in random order."""
    have = [{(o.colour, o.shape) for o in objs} for objs in (a, b)]
    found = [(scenes.name(scenes.Obj(s, c, 0), lang), k) for k in (0, 1) for c, s in sorted(have[k] - have[1 - k])]
    rng.shuffle(found)
    return found


def ask_which(thing: str, lang: str) -> str:
    return f"哪张图里有{thing}？" if lang == "zh" else f"Which picture has the {thing}?"


def which_question(a, b, rng: random.Random, lang: str):
    """(question, answer, 0 or 1) about a (colour, shape) found in exactly one of two scenes,
    each picture equally likely to be the answer; None when both hold the same pairs.
    The answer describes and checks picture 1, describes picture 2, then names the one (reasoning())."""
    found = exclusive(a, b, rng, lang)
    sides = sorted({k for _, k in found})
    if not sides:
        return None
    k = rng.choice(sides)
    thing = next(t for t, side in found if side == k)
    return ask_which(thing, lang), reasoning(a, b, thing, k, lang) + verdict(k, lang), k


def described(n: int, objs, lang: str) -> str:
    """Picture n named, then its caption."""
    return f"图{n}：{scenes.caption(objs, lang)}" if lang == "zh" else f"Picture {n}: {scenes.caption(objs, lang)} "


def reasoning(a, b, thing: str, k: int, lang: str) -> str:
    """Picture 1 described and checked for the thing, then picture 2 described. Answering "which
    picture has X" straight from the image tokens stayed at chance in every try (docs/datasets.md);
    this way the one search is in the text just written, with nothing else to tell it from."""
    gap = "" if lang == "zh" else " "
    return described(1, a, lang) + check(thing, k, lang) + gap + described(2, b, lang)


def check(thing: str, k: int, lang: str) -> str:
    """Whether picture 1 has the thing (k == 0: it does)."""
    if lang == "zh":
        return f"图1里{'有' if k == 0 else '没有'}{thing}。"
    return f"Picture 1 {'has' if k == 0 else 'does not have'} the {thing}."


def verdict(k: int, lang: str) -> str:
    return f"所以是{ORDINAL['zh'][k]}。" if lang == "zh" else f"So it is the {ORDINAL['en'][k]} one."


def chosen(answer: str, lang: str) -> int | None:
    """Which picture an answer names last (its verdict), 0 or 1; None when it names neither."""
    at = [answer.rfind(word) for word in ORDINAL[lang]]
    return None if max(at) < 0 else at.index(max(at))


def text_sample(i: int, a, b, rng: random.Random, lang: str) -> dict | None:
    """A text-only sample: the first question with picture 1's description given, answered with
    check(); then more such questions in turn (the things come from a pair, so about half are
    in picture 2 instead, often sharing a colour or a shape with one in picture 1)."""
    found = exclusive(a, b, rng, lang)[:TEXT_QUESTIONS]
    if not found:
        return None
    qa = [(ask_which(thing, lang), check(thing, k, lang)) for thing, k in found]
    qa[0] = (qa[0][0] + ("" if lang == "zh" else " ") + described(1, a, lang).rstrip(), qa[0][1])
    return {"id": f"text_{i:06d}", "conversations": turns(qa)}


def count_turn(objs, k: int, lang: str):
    n = len(objs)
    if lang == "zh":
        return f"{ORDINAL['zh'][k]}图里有几个形状？", f"{scenes.COUNT_ZH[n]}个。"
    return f"How many shapes are in the {ORDINAL['en'][k]} picture?", f"{scenes.COUNT_EN[n].capitalize()}."


def turns(pairs) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def scene_sample(i: int, objs, fname: str, rng: random.Random, lang: str) -> dict:
    qa = [(rng.choice(scenes.CAPTION_PROMPTS[lang]), scenes.caption(objs, lang))]
    qa += scenes.pick_questions(objs, rng, lang, QUESTIONS)
    rng.shuffle(qa)
    qa[0] = ("<image>\n" + qa[0][0], qa[0][1])
    return {"id": f"scene_{i:06d}", "image": f"images/{fname}", "conversations": turns(qa)}


def pair_sample(i: int, first, second, files, rng: random.Random, lang: str) -> dict | None:
    asked = which_question(first, second, rng, lang)
    if asked is None:
        return None
    q, a, _ = asked
    qa = [(q, a)] + [count_turn(objs, k, lang) for k, objs in enumerate((first, second))]
    rng.shuffle(qa)                                     # any turn may come first: each must read its question
    qa[0] = ("<image>\n<image>\n" + qa[0][0], qa[0][1])
    return {"id": f"pair_{i:06d}", "image": [f"images/{f}" for f in files], "conversations": turns(qa)}


def export(out: Path, count: int, split: str = "train", seed: int = 0, lang: str = "zh", size: int = 72):
    """Write images/ and conversations.json (`count` scene samples and about count/PAIR_EVERY pairs),
    and text/conversations.json (the text-only samples). Returns both lists."""
    if (out / "captions.json").exists():
        raise UserError(f"{out} 里已有 captions.json（描述格式），对话数据要放在另一个文件夹，请换一个 --out。")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / scenes.MARKER).write_text("scenes.py --format llava\n", encoding="utf-8")
    scenes.write_words(out, lang)
    objs_of, files, samples = [], [], []
    for i in range(count):
        objs, rng = scenes.make_scene(seed, split, i)
        fname = f"scene_{split}_{i:06d}.png"
        scenes.render(objs, rng, size).save(out / "images" / fname)
        objs_of.append(objs)
        files.append(fname)
        samples.append(scene_sample(i, objs, fname, random.Random(f"chat/{seed}/{split}/{i}"), lang))
    for i in range(0, count - 1, PAIR_EVERY):
        pair = pair_sample(i, objs_of[i], objs_of[i + 1], files[i:i + 2], random.Random(f"pair/{seed}/{split}/{i}"), lang)
        if pair:
            samples.append(pair)
    (out / "conversations.json").write_text(json.dumps(samples, ensure_ascii=False, indent=1), encoding="utf-8")
    texts = []
    for j in range(count * TEXT_PER_SCENE):             # two scenes each from count on: never rendered
        a, b = (scenes.make_scene(seed, split, count + 2 * j + k)[0] for k in (0, 1))
        text = text_sample(j, a, b, random.Random(f"text/{seed}/{split}/{j}"), lang)
        if text:
            texts.append(text)
    (out / "text").mkdir(exist_ok=True)
    (out / "text" / "conversations.json").write_text(json.dumps(texts, ensure_ascii=False, indent=0), encoding="utf-8")
    return samples, texts


# ----------------------------------------------------------------------------- scoring

def pair_items(count: int, split: str = "test", seed: int = 0, lang: str = "zh", size: int = 72) -> list[tuple]:
    """[(two PIL images, question, answer, (first's objects, second's))] on scene pairs never trained on (from `split`)."""
    items, i = [], 0
    while len(items) < count:
        (a, ra), (b, rb) = scenes.make_scene(seed, split, 2 * i), scenes.make_scene(seed, split, 2 * i + 1)
        asked = which_question(a, b, random.Random(f"score/{seed}/{split}/{i}"), lang)
        i += 1
        if asked:
            items.append(([scenes.render(a, ra, size), scenes.render(b, rb, size)], asked[0], asked[1], (a, b)))
    return items


def score_pairs(model, tok, count: int, split: str = "test", seed: int = 0, lang: str = "zh") -> dict:
    """On `count` fresh scene pairs: {"pairs": accuracy of "which picture has ...?" (chance 50%),
    "pairs_count": of "how many shapes are in the first/second picture?", both asked of each pair
    (chance 1/3: one to three shapes)}, each question the conversation's first turn."""
    from evaluate import generate_texts, normalise
    asked = []
    for ims, q, want, objs in pair_items(count, split, seed, lang, model.cfg.vit_image_size):
        asked.append(("pairs", ims, q, want))
        asked += [("pairs_count", ims, *count_turn(o, k, lang)) for k, o in enumerate(objs)]
    samples = [{"images": ims, "messages": [{"role": "user", "content": IMAGE * 2 + q}]} for _, ims, q, _ in asked]
    answers = generate_texts(model, tok, samples, max_new_tokens=128)
    right = {"pairs": 0, "pairs_count": 0}
    for got, (kind, _, _, want) in zip(answers, asked):
        if kind == "pairs":                             # the verdict counts, not the descriptions before it
            right[kind] += chosen(got, lang) == chosen(want, lang)
        else:
            right[kind] += normalise(got) == normalise(want)
    return {"pairs": right["pairs"] / count, "pairs_chance": CHANCE,
            "pairs_count": right["pairs_count"] / (2 * count), "pairs_count_chance": 1 / 3}
