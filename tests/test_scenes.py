import json

import pytest
import torch
from PIL import Image

import probes
import scenes


def test_generator_is_deterministic():
    a = scenes.SceneDataset(5, seed=7)[(2, 3)]
    b = scenes.SceneDataset(5, seed=7)[(2, 3)]
    assert a["messages"] == b["messages"] and a["image"].tobytes() == b["image"].tobytes()
    c = scenes.SceneDataset(5, seed=8)[(2, 3)]
    assert c["image"].tobytes() != a["image"].tobytes()


def test_pictures_are_drawn_once_up_front_and_items_are_as_drawn_afresh(monkeypatch):
    data = scenes.SceneDataset(4, seed=7, image_size=72)
    monkeypatch.setattr(scenes, "render", lambda *a: pytest.fail("drawn again"))
    items = [data[(epoch, 3)] for epoch in (0, 1)]        # two epochs: new questions, the same picture
    assert items[1]["image"] is items[0]["image"] and items[1]["messages"] != items[0]["messages"]
    monkeypatch.undo()
    objs, rng = scenes.make_scene(7, "train", 3)
    assert items[1]["image"].tobytes() == scenes.render(objs, rng, 72).tobytes()
    monkeypatch.setattr(scenes.SceneDataset, "CACHE_BYTES", 2 * 3 * 72 * 72)   # room for two pictures
    small = scenes.SceneDataset(4, seed=7, image_size=72)
    assert list(small.kept) == [0, 1]
    assert small[3]["image"].tobytes() == items[0]["image"].tobytes()           # the rest drawn when asked


def test_a_recoloured_item_swaps_the_colour_channels_and_asks_nothing_that_names_a_colour():
    plain = scenes.SceneDataset(40, seed=3, image_size=72)
    swapped = scenes.SceneDataset(40, seed=3, image_size=72, recolour=0.5)
    colour_words = set(scenes.COLOURS_ZH.values())
    changed = 0
    for i in range(40):
        a, b = plain[(1, i)], swapped[(1, i)]
        if b["image"].tobytes() == a["image"].tobytes():          # not drawn for recolouring: the same item
            assert b["messages"] == a["messages"] and torch.equal(b["cells"], a["cells"])
            continue
        changed += 1
        bands = a["image"].split()
        assert any(b["image"].tobytes() == Image.merge("RGB", [bands[c] for c in perm]).tobytes()
                   for perm in scenes.PERMS)
        answers = [m["content"] for m in b["messages"] if m["role"] == "assistant"]
        assert answers and not any(w in text for text in answers for w in colour_words)
        assert torch.equal(b["cells"][0], a["cells"][0]) and (b["cells"][1] == scenes.IGNORE).all()
    assert 10 <= changed <= 30                                    # about half of 40


def test_a_reshaped_item_draws_shapes_of_no_name_in_their_colours_and_asks_only_count_and_colour():
    plain = scenes.SceneDataset(60, seed=4, image_size=72)
    both = scenes.SceneDataset(60, seed=4, image_size=72, recolour=0.25, reshape=0.5)
    reshaped = 0
    for i in range(60):
        a, b = plain[(2, i)], both[(2, i)]
        objs, _ = scenes.make_scene(4, "train", i)
        if (b["cells"][1] == scenes.IGNORE).all() or b["image"].tobytes() == a["image"].tobytes():
            continue                                               # recoloured, or neither
        reshaped += 1
        assert torch.equal(b["cells"][1], a["cells"][1])           # colours kept and still taught to the probe
        occupied = a["cells"][0] > 0
        assert (b["cells"][0][occupied] == scenes.IGNORE).all() and (b["cells"][0][~occupied] == 0).all()
        truth = {(q, ans) for _, q, ans, _ in scenes.colour_at(objs) + scenes.questions(objs)[:1]}
        asked = [(b["messages"][k]["content"], b["messages"][k + 1]["content"]) for k in range(0, len(b["messages"]), 2)]
        assert asked and all(qa in truth for qa in asked)           # the count or "what colour is at <cell>"
        shape_words = set(scenes.SHAPES_ZH.values())
        assert not any(w in ans for _, ans in asked for w in shape_words)
        pixels = torch.tensor(list(b["image"].getdata())).float()  # the same colours are there
        for o in objs:
            assert (pixels - torch.tensor(scenes.COLOURS[o.colour])).abs().max(1).values.min() < 25
    assert 12 <= reshaped <= 35                                    # about half of the three quarters not recoloured


def test_no_channel_swap_shows_a_shape_near_a_colour_it_is_held_out_in():
    blue_triangle = [scenes.Obj("triangle", "blue", 0)]             # (35, 75, 220): with R and B swapped, red-ish
    assert (2, 1, 0) not in scenes.far_from_heldout(blue_triangle) and (1, 0, 2) in scenes.far_from_heldout(blue_triangle)
    plain = scenes.SceneDataset(80, seed=5, image_size=72)
    swapped = scenes.SceneDataset(80, seed=5, image_size=72, recolour=0.5)
    for i in range(80):
        a, b = plain[(0, i)], swapped[(0, i)]
        objs, _ = scenes.make_scene(5, "train", i)
        allowed = scenes.far_from_heldout(objs) + [(0, 1, 2)]
        bands = a["image"].split()
        shown = next(p for p in allowed if Image.merge("RGB", [bands[c] for c in p]).tobytes() == b["image"].tobytes())
        second = tuple(shown[c] for c in b["recolour"].tolist())    # the probe's look, in the scene's own colours
        assert second in allowed


def test_colour_at_names_the_colour_of_every_cell():
    objs = [scenes.Obj("ring", "red", 0), scenes.Obj("star", "blue", 8)]
    zh = {q: a for _, q, a, _ in scenes.colour_at(objs)}
    en = {q: a for _, q, a, _ in scenes.colour_at(objs, "en")}
    assert zh["左上方是什么颜色的？"] == "红色。" and zh["右下方是什么颜色的？"] == "蓝色。" and zh["中间是什么颜色的？"] == "中间没有形状。"
    assert en["What color is the shape at the bottom right?"] == "Blue." and len(zh) == len(en) == 9


def test_the_probe_learns_no_colour_from_a_recoloured_item_even_when_a_batch_has_only_such():
    vision = torch.nn.Identity()
    probe = probes.CellProbe(vision, 8, recolour=False)
    feats = torch.randn(2, 9, 8)                                  # 9 patches: one per cell, pooling keeps them
    cells = torch.tensor([[[1] * 9, [2] * 9], [[3] * 9, [4] * 9]])

    pixels = torch.zeros(2, 3, 12, 12, dtype=torch.uint8)

    def loss(colours):
        vision(feats)                                             # the forward hook keeps the features
        return probe({"cells": torch.cat([cells[:, :1], colours[:, None]], 1), "pixels": pixels})

    none_named = loss(torch.full((2, 9), scenes.IGNORE))
    first_named = loss(torch.stack([cells[0, 1], torch.full((9,), scenes.IGNORE)]))
    assert torch.isfinite(none_named)
    torch.testing.assert_close(first_named - none_named,
                               torch.nn.functional.cross_entropy(probe.colour(feats[0]), cells[0, 1]))


def test_heldout_pairs_never_in_training_and_always_in_heldout_split():
    for i in range(3000):
        objs, _ = scenes.make_scene(0, "train", i)
        assert not any((o.colour, o.shape) in scenes.HELDOUT for o in objs)
        objs, _ = scenes.make_scene(0, "test", i)
        assert not any((o.colour, o.shape) in scenes.HELDOUT for o in objs)
    for i in range(300):
        objs, _ = scenes.make_scene(0, "heldout", i)
        assert any((o.colour, o.shape) in scenes.HELDOUT for o in objs)


def test_every_heldout_colour_and_shape_is_still_seen_in_training():
    seen = set()
    for i in range(2000):
        seen |= {(o.colour, o.shape) for o in scenes.make_scene(0, "train", i)[0]}
    assert {c for c, _ in scenes.HELDOUT} <= {c for c, _ in seen}
    assert {s for _, s in scenes.HELDOUT} <= {s for _, s in seen}


def test_caption_names_count_position_colour_shape_and_parses_back():
    objs = [scenes.Obj("circle", "red", 0), scenes.Obj("triangle", "blue", 8)]
    cap = scenes.caption(objs)
    assert cap == "图中有两个形状：左上方是一个红色的圆形，右下方是一个蓝色的三角形。"
    assert scenes.parse_caption(cap) == {(0, "red", "circle"), (8, "blue", "triangle")}
    en = scenes.caption(objs, "en")
    assert en == "There are two shapes: a red circle at the top left, and a blue triangle at the bottom right."
    assert scenes.parse_caption(en, "en") == {(0, "red", "circle"), (8, "blue", "triangle")}


def test_questions_cover_every_kind_with_right_answers():
    objs = [scenes.Obj("circle", "red", 0), scenes.Obj("circle", "green", 4), scenes.Obj("cross", "blue", 8)]
    qa = {q: a for _, q, a, _ in scenes.questions(objs)}
    assert qa["图中有几个形状？"] == "三个。"
    assert qa["十字形是什么颜色的？"] == "蓝色。"
    assert "圆形是什么颜色的？" not in qa                  # ambiguous: two circles
    assert qa["菱形是什么颜色的？"] == "图中没有菱形。"
    assert qa["中间是什么形状？"] == "圆形。"
    assert qa["右下方有什么？"] == "一个蓝色的十字形。"
    assert qa["右侧有什么？"] == "右侧没有形状。"


def test_export_writes_the_guides_folder_format(tmp_path):
    scenes.main(["--out", str(tmp_path), "--count", "4"])
    caps = json.loads((tmp_path / "captions.json").read_text(encoding="utf-8"))
    assert len(caps) == 4 and all((tmp_path / "images" / f).is_file() for f in caps)
    meta = [json.loads(l) for l in (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert meta[0]["objects"][0]["colour_zh"] in scenes.COLOURS_ZH.values()
    assert meta[0]["qa"] and meta[0]["caption"] == caps[meta[0]["file_name"].split("/")[-1]]


def test_training_questions_follow_the_kind_weights_and_balance_yes_and_no():
    import random
    kinds, present = {}, {}
    for i in range(600):
        objs, _ = scenes.make_scene(0, "train", i)
        truth = {(q, a): (kind, p) for kind, q, a, p in scenes.questions(objs, "zh")}
        picked = scenes.pick_questions(objs, random.Random(i), "zh", 3)
        assert len(set(picked)) == 3 and all(qa in truth for qa in picked)
        for qa in picked:
            kind, p = truth[qa]
            kinds[kind] = kinds.get(kind, 0) + 1
            present.setdefault(kind, []).append(p)
    total = sum(kinds.values())
    share = {k: kinds[k] / total for k in kinds}
    weights = {k: scenes.KIND_WEIGHTS[k] for k in scenes.ASKED}
    expected = {k: w / sum(weights.values()) for k, w in weights.items()}
    # the count question exists once per scene, so it is drawn a little less than its weight
    assert share["colour"] == pytest.approx(expected["colour"], abs=0.06)
    assert share["colour"] > 1.5 * share["shape"]
    for kind in ("colour", "shape", "object"):
        yes = sum(present[kind]) / len(present[kind])
        assert 0.4 < yes < 0.6, (kind, yes)


def test_export_never_replaces_a_users_own_captions(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    mine = tmp_path / "vision_train"
    mine.mkdir()
    (mine / "captions.json").write_text('{"cat.jpg": "我的猫"}', encoding="utf-8")
    run = lambda *extra: subprocess.run([sys.executable, "scenes.py", "--out", str(mine), "--count", "3", *extra],
                                        cwd=root, capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 2 and r.stderr.startswith("错误：") and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((mine / "captions.json").read_text(encoding="utf-8")) == {"cat.jpg": "我的猫"}
    assert run("--overwrite").returncode == 0 and len(json.loads((mine / "captions.json").read_text())) == 3
    assert run("--count", "4").returncode == 0          # a folder scenes.py wrote itself is refreshed freely
    assert len(json.loads((mine / "captions.json").read_text())) == 4


def test_english_uses_an_before_vowels():
    objs = [scenes.Obj("circle", "orange", 4)]
    assert scenes.caption(objs, "en") == "There is one shape: an orange circle at the center."
    assert scenes.parse_caption(scenes.caption(objs, "en"), "en") == {(4, "orange", "circle")}
    answers = {q: a for _, q, a, _ in scenes.questions(objs, "en")}
    assert answers["What is at the center?"] == "An orange circle."
    assert "a orange" not in " ".join(scenes.all_texts("en")).lower()


def test_cell_probe_also_reads_the_scenes_recoloured_for_shape_and_place_only(tok):
    """The probe runs the encoder a second time on the batch with its colour channels swapped (the
    order each item names, never the identity) and asks that pass for shapes and cells only:
    the colour head's gradient is the same as without the second pass, the shape head's is not."""
    import torch
    from collate import Collator
    from conftest import tiny_config
    from images import normalise
    from model import VLM
    torch.manual_seed(0)
    model = VLM(tiny_config(tok)).train()
    data = scenes.SceneDataset(6, "train", 0, "zh", model.cfg.vit_image_size)
    batch = Collator(tok, model.cfg)([data[i] for i in range(6)])
    seen = []
    model.vision.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    grads = {}
    for recolour in (False, True):
        torch.manual_seed(1)
        probe = probes.CellProbe(model.vision, model.cfg.vit_dim, recolour=recolour)
        model.vision(normalise(batch["pixels"], model.cfg))          # the model's own pass, as in a step
        probe(batch).backward()
        grads[recolour] = {n: p.grad.clone() for n, p in probe.named_parameters()}
    plain, swapped = seen[-2], seen[-1]
    assert len(seen) == 3 and torch.equal(seen[0], plain)            # without recolouring: one pass only
    for img, out, order in zip(plain, swapped, batch["recolour"]):
        assert torch.equal(out, img[order])
    assert len({tuple(o) for o in batch["recolour"].tolist()}) > 1 and not torch.equal(plain, swapped)
    torch.testing.assert_close(grads[True]["colour.weight"], grads[False]["colour.weight"])
    assert not torch.allclose(grads[True]["shape.weight"], grads[False]["shape.weight"])


def test_hidden_answer_tokens_are_fed_as_pad_while_the_targets_stay_true(tok):
    """A training set made with hide=p has the collator feed about p of the answer tokens as <pad>;
    labels, targets, prompts and image tokens are what they were, the validation set (hide 0) is
    untouched, and the same batch hides the same tokens again (a resumed run replays it)."""
    from collate import Collator
    from conftest import tiny_config
    cfg = tiny_config(tok)
    plain = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size)
    hiding = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size, hide=0.3)
    collate = Collator(tok, cfg, pack=True)
    a = collate([plain[(1, i)] for i in range(48)])
    b, again = (collate([hiding[(1, i)] for i in range(48)]) for _ in range(2))
    answer = a["labels"] != -100
    changed = a["input_ids"] != b["input_ids"]
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["targets"].target, b["targets"].target)
    assert not (changed & ~answer).any() and (b["input_ids"][changed] == tok.pad_id).all()
    assert 0.25 < changed.sum() / answer.sum() < 0.35
    assert torch.equal(b["input_ids"], again["input_ids"]) and "hide" not in b
    assert tok.pad_id not in a["input_ids"][a["attention_mask"] > 0]         # hide 0: every token as it is
