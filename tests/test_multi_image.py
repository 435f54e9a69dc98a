"""Several images per sample: the collator's order of pixels, the splice in a padded batch equal
to each sample alone (built-in model and a Hugging Face backbone), packed rows that train exactly
like padded ones, and the length cut that never drops an image token."""
import pytest
import torch
from PIL import Image

import backbones
import tiny_hf
from collate import Collator, pack
from images import normalise, to_tensor
from layout import positions_and_mask
from model import VLM, VLMConfig
from tests.conftest import tiny_config
from train_step import scored

COLOURS = [(200, 30, 30), (20, 180, 40), (30, 40, 210), (230, 230, 20), (120, 20, 160)]


def picture(i: int) -> Image.Image:
    img = Image.new("RGB", (40, 40), COLOURS[i % len(COLOURS)])
    img.paste((255, 255, 255), (i * 5 % 30, 0, i * 5 % 30 + 10, 10 + i))
    return img


def samples():
    """0, 1 and 2 images (one pair in a later turn), and the older {"image": ...} form."""
    user, bot = (lambda t: {"role": "user", "content": t}), (lambda t: {"role": "assistant", "content": t})
    return [
        {"images": [], "messages": [user("你好，今天怎么样？"), bot("很好。")]},
        {"images": [picture(0)], "messages": [user("描述这张图片"), bot("一个红色的方形。")]},
        {"images": [picture(1), picture(2)], "messages": [
            user("<image>图里有什么？"), bot("一个绿色的方形。"), user("这张呢？<image>"), bot("蓝色的。")]},
        {"image": picture(3), "messages": [user("<image>什么颜色？"), bot("黄色。")]},
        {"images": [picture(4), picture(0)], "messages": [user("哪张图是红色的？"), bot("第二张。")]},
    ]


def builtin(tok):
    torch.manual_seed(0)
    return VLM(tiny_config(tok)).eval(), tok


def clip_llama(tmp_path):
    model, tok = backbones.build_vlm(str(tiny_hf.save_clip(tmp_path / "clip")), str(tiny_hf.save_llama(tmp_path / "llama")))
    return model.eval(), tok


def test_batch_pixels_are_every_image_in_sample_then_image_order(tok):
    cfg = tiny_config(tok)
    batch = Collator(tok, cfg, train=True)(samples())
    order = [0, 1, 2, 3, 4, 0]
    want = torch.stack([to_tensor(picture(i), cfg) for i in order])
    assert torch.equal(batch["pixels"], want)
    per_row = (batch["input_ids"] == tok.image_id).sum(1).tolist()
    assert per_row == [0, cfg.image_tokens, 2 * cfg.image_tokens, cfg.image_tokens, 2 * cfg.image_tokens]
    assert Collator(tok, cfg)([samples()[0]])["pixels"] is None       # no image in the batch


@pytest.mark.parametrize("kind", ["builtin", "clip+llama"])
@pytest.mark.parametrize("train", [True, False], ids=["right-padded", "left-padded"])
def test_padded_batch_with_0_1_2_images_equals_each_sample_alone(kind, train, tok, tmp_path):
    model, t = builtin(tok) if kind == "builtin" else clip_llama(tmp_path)
    collate = Collator(t, model.cfg, train=train)
    batch = collate(samples())
    am = batch["attention_mask"]
    assert not bool(am.all())                                         # rows really are padded
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixels"])
        _, logits = model(batch["input_ids"], batch["pixels"], attention_mask=am)
        for r, s in enumerate(samples()):
            one = collate([s])
            real = am[r].bool()
            alone_emb = model.embed(one["input_ids"], one["pixels"])[0]
            alone = model(one["input_ids"], one["pixels"])[1][0]
            assert torch.equal(batch["input_ids"][r][real], one["input_ids"][0])
            torch.testing.assert_close(emb[r][real], alone_emb, rtol=0, atol=1e-6)
            torch.testing.assert_close(logits[r][real], alone, rtol=1e-4, atol=1e-5)


def test_packed_rows_train_exactly_like_one_sample_a_row(tok):
    """Packing (collate.pack) puts the samples, with 0, 1 and 2 images, into fewer rows; each still
    sees only itself, so the loss and every gradient equal the padded batch's; images and per-sample
    tensors follow the packed order."""
    model, _ = builtin(tok)
    model.train()
    many = [{**s, "n": torch.tensor(i)} for i, s in enumerate(samples() * 3)]
    results = []
    for pack in (False, True):
        batch = Collator(tok, model.cfg, train=True, pack=pack)(many)
        model.zero_grad()
        loss, _ = scored(model, batch)
        loss.backward()
        results.append((batch, loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, loss, grads), (packed, loss_packed, grads_packed) = results
    assert len(packed["input_ids"]) < len(padded["input_ids"]) == packed["samples"] == len(many)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]      # no row grows
    assert int(packed["attention_mask"].max()) >= 2                            # rows really hold several
    order = packed["n"].tolist()
    assert sorted(order) == list(range(len(many))) and order != sorted(order)
    want = [to_tensor(img, model.cfg) for i in order for img in many[i].get("images", [many[i].get("image")])]
    assert torch.equal(packed["pixels"], torch.stack(want))
    torch.testing.assert_close(loss_packed, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_packed[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_every_tensor_of_a_batch_can_be_pinned(pack, tok):
    """On a GPU the DataLoader pins each batch: it copies every tensor into pinned memory of the
    same strides, which fails for a view whose elements share memory (an expanded arange did, on
    the H200, for every unpacked training batch). The copy is made here the same way."""
    cfg = tiny_config(tok)
    for train in (True, False):
        batch = Collator(tok, cfg, train=train, pack=pack)(samples() * 2)
        tensors = [t for v in batch.values() for t in (v if isinstance(v, tuple) else [v]) if isinstance(t, torch.Tensor)]
        assert len(tensors) >= (8 if train else 3)
        for t in tensors:
            assert torch.equal(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t), t)


def test_pack_fills_rows_longest_first_and_never_past_the_row():
    rows = pack([5, 9, 2, 4, 7, 1], 9)
    assert rows == [[1], [4, 2], [0, 3], [5]]             # 9 | 7+2 | 5+4 | 1
    assert sorted(i for r in rows for i in r) == list(range(6))


def test_each_image_lands_in_its_own_run(tok):
    """Two different images in one row: the first run holds the first image's features."""
    model, _ = builtin(tok)
    batch = Collator(tok, model.cfg, train=False)(samples()[2:3])
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixels"])[0]
        feats = model.projector(model.vision(normalise(batch["pixels"], model.cfg)))   # (2, N, D)
    runs = emb[batch["input_ids"][0] == tok.image_id].view(2, model.cfg.image_tokens, -1)
    torch.testing.assert_close(runs, feats)
    assert not torch.allclose(feats[0], feats[1])


def cut_case(tok, cfg, answer_words: int, late_image: bool):
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    long_answer = "一个红色的圆形在左上角。" * answer_words
    messages = [user("<image>图里有什么？"), bot(long_answer)]
    if late_image:
        messages += [user("<image>这张呢？"), bot("蓝色的。")]
    return {"images": [picture(0)] * (2 if late_image else 1), "messages": messages}


def test_a_long_answer_is_cut_after_the_last_image_only(tok):
    cfg = tiny_config(tok, lm_max_len=64)
    collate = Collator(tok, cfg, train=True)
    ids, labels = collate.encode(cut_case(tok, cfg, 10, late_image=False))
    assert len(ids) == 64 and ids.count(tok.image_id) == cfg.image_tokens
    assert any(l != -100 for l in labels)
    batch = collate([cut_case(tok, cfg, 10, late_image=False)])       # still trains: the splice matches
    with torch.no_grad():
        loss, _ = VLM(cfg).eval()(batch["input_ids"], batch["pixels"], batch["labels"])
    assert torch.isfinite(loss)


def test_a_cut_that_would_drop_an_image_or_every_answer_is_refused(tok):
    cfg = tiny_config(tok, lm_max_len=64)
    collate = Collator(tok, cfg, train=True)
    late = cut_case(tok, cfg, 10, late_image=True)                    # the second image sits past the limit
    with pytest.raises(ValueError, match="prompt too long"):
        collate.encode(late)
    short = Collator(tok, tiny_config(tok, lm_max_len=cfg.image_tokens + 4), train=True)
    with pytest.raises(ValueError, match="prompt too long"):          # nothing supervised would be left
        short.encode(cut_case(tok, cfg, 1, late_image=False))
    with pytest.raises(ValueError, match="prompt too long"):          # prompts are never cut for generation
        Collator(tok, cfg, train=False).encode(late)
