import pytest
import torch
from PIL import Image

from collate import Collator
from images import normalise
from layout import positions_and_mask
from model import VLM, VLMConfig, sample
from conftest import tiny_config


def prompts(tok, cfg, texts, n_images=1):
    collate = Collator(tok, cfg, train=False)
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    return collate([{"image": img if n_images else None, "messages": [{"role": "user", "content": t}]}
                    for t in texts])


def test_config_round_trips_through_a_plain_dict(tok):
    cfg = tiny_config(tok)
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, tuple)) for v in d.values())
    assert VLMConfig.from_dict(d) == cfg
    import json
    assert VLMConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError):
        VLMConfig.from_dict({**d, "bogus": 1})


def test_splice_puts_image_features_exactly_at_placeholders(tiny, tok):
    b = prompts(tok, tiny.cfg, ["描述这张图片", "hi"])
    emb = tiny.embed(b["input_ids"], b["pixels"])
    feats = tiny.projector(tiny.vision(normalise(b["pixels"], tiny.cfg)))   # (2, N, D)
    text = tiny.lm.embed(b["input_ids"])
    is_img = b["input_ids"] == tok.image_id
    assert is_img.sum() == 2 * tiny.cfg.image_tokens
    for r in range(2):
        torch.testing.assert_close(emb[r][is_img[r]], feats[r])
        torch.testing.assert_close(emb[r][~is_img[r]], text[r][~is_img[r]])


def test_splice_count_mismatch_is_a_clear_error(tiny, tok):
    b = prompts(tok, tiny.cfg, ["a"])
    with pytest.raises(ValueError, match="image tokens and images do not match"):
        tiny.embed(b["input_ids"], torch.cat([b["pixels"], b["pixels"]]))
    with pytest.raises(ValueError, match="do not match"):
        tiny.embed(b["input_ids"], None)                             # placeholders but no image
    text_only = prompts(tok, tiny.cfg, ["a"], n_images=0)
    with pytest.raises(ValueError, match="do not match"):
        tiny.embed(text_only["input_ids"], b["pixels"])              # an image but no placeholder


def test_loss_ignores_prompt_image_and_pad_tokens(tiny, tok):
    collate = Collator(tok, tiny.cfg, train=True)
    img = Image.new("RGB", (16, 16), "blue")
    s = {"image": img, "messages": [{"role": "user", "content": "图里有什么？"},
                                    {"role": "assistant", "content": "一个蓝色的圆形。"}]}
    long = {"image": img, "messages": [{"role": "user", "content": "描述这张图片" * 5},
                                       {"role": "assistant", "content": "没有。"}]}
    b = collate([s, long])
    sup = b["labels"] != -100
    # supervised = answer tokens + </s>, nothing of prompt, image or padding
    answer = tok.encode("一个蓝色的圆形。") + [tok.eos_id]
    assert b["labels"][0][sup[0]].tolist() == answer
    assert not (b["input_ids"][sup] == tok.image_id).any()
    assert not (b["attention_mask"].bool() == False)[sup].any()
    # changing anything outside the supervised positions (prompt text, image, pad) can't change
    # the targets; the loss equals a manual cross-entropy over exactly those positions
    loss, logits = tiny(b["input_ids"], b["pixels"], b["labels"])
    _, full = tiny(b["input_ids"], b["pixels"])
    tgt = b["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(full[:, :-1][tgt != -100], tgt[tgt != -100])
    torch.testing.assert_close(loss, manual)
    # pad rows at the end don't affect row 0's loss (right padding + causal attention)
    l0, _ = tiny(b["input_ids"][:1, : sup[0].nonzero().max() + 1], b["pixels"][:1],
                 b["labels"][:1, : sup[0].nonzero().max() + 1])
    manual0 = torch.nn.functional.cross_entropy(full[0, :-1][tgt[0] != -100], tgt[0][tgt[0] != -100])
    torch.testing.assert_close(l0, manual0, rtol=1e-4, atol=1e-5)


def test_kv_cache_generation_equals_full_recompute(tiny, tok):
    b = prompts(tok, tiny.cfg, ["描述这张图片"])
    ids, pix = b["input_ids"], b["pixels"]
    got = torch.stack(list(tiny.generate(ids, pix, max_new_tokens=12)), 1)[0].tolist()
    seq = ids
    ref = []
    for _ in range(len(got)):                       # no cache: rerun the whole sequence each step
        _, logits = tiny(seq, pix)
        nxt = int(logits[0, -1].argmax())
        ref.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert got == ref


def test_generation_past_the_context_is_refused_up_front(tiny, tok):
    b = prompts(tok, tiny.cfg, ["描述这张图片"])
    room = tiny.cfg.lm_max_len - b["input_ids"].shape[1]
    got = list(tiny.generate(b["input_ids"], b["pixels"], max_new_tokens=room))   # fills the context: fine
    assert 1 <= len(got) <= room
    with pytest.raises(ValueError, match="exceeds the context"):
        next(tiny.generate(b["input_ids"], b["pixels"], max_new_tokens=room + 1))


def test_batched_left_padded_generation_equals_one_by_one(tiny, tok):
    texts = ["描述这张图片", "左上方有什么？这是一个比较长的问题，用来制造左侧填充", "What do you see?"]
    b = prompts(tok, tiny.cfg, texts)
    assert (b["attention_mask"][:, 0] == 0).any()                   # there is left padding
    batched = torch.stack(list(tiny.generate(b["input_ids"], b["pixels"], b["attention_mask"],
                                             max_new_tokens=10)), 1)
    for r, t in enumerate(texts):
        one = prompts(tok, tiny.cfg, [t])
        single = torch.stack(list(tiny.generate(one["input_ids"], one["pixels"], max_new_tokens=10)), 1)[0]
        n = len(single)
        assert batched[r, :n].tolist() == single.tolist()


def test_each_row_stops_at_its_own_stop_token_and_pads_after(tiny, tok):
    b = prompts(tok, tiny.cfg, ["描述这张图片", "左上方有什么？"])

    def run(**kw):                                 # seeded sampling: the same draws each run
        g = torch.Generator().manual_seed(3)
        return torch.stack(list(tiny.generate(b["input_ids"], b["pixels"], b["attention_mask"],
                                              max_new_tokens=12, temperature=1.0, generator=g, **kw)), 1)
    free = run()
    row0 = free[0].tolist()
    j = next(j for j in range(1, 12) if row0[j] not in row0[:j])   # a token first seen at step j
    out = run(stop_ids=[row0[j]])
    assert out[0, :j + 1].tolist() == row0[:j + 1]
    assert (out[0, j + 1:] == tok.pad_id).all()
    row1 = free[1].tolist()
    k = row1.index(row0[j]) + 1 if row0[j] in row1 else out.shape[1]
    assert out[1, :k].tolist() == row1[:k]
    # when every row has stopped, generation ends early
    assert run(stop_ids=free[:, 0].tolist()).shape[1] == 1


def test_sampling_modes():
    logits = torch.tensor([[0.0, 5.0, 4.0, -10.0]])
    assert sample(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}
    draws = {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(100)}
    assert draws == {1}


def test_positions_skip_left_padding():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pos, mask = positions_and_mask(am, am.shape)
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert mask[0, 0, 3].tolist() == [False, False, True, True]
    assert positions_and_mask(torch.ones(2, 3, dtype=torch.long), (2, 3))[1] is None


def test_a_packed_row_keeps_its_samples_apart():
    """attention_mask numbers a packed row's samples (0 is padding): positions restart with each
    sample, a token sees the earlier tokens of its own sample only."""
    am = torch.tensor([[1, 1, 2, 2, 2, 0]])
    pos, mask = positions_and_mask(am, am.shape)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert mask[0, 0, 1].tolist() == [True, True, False, False, False, False]
    assert mask[0, 0, 4].tolist() == [False, False, True, True, True, False]
    assert mask[0, 0, 5].tolist() == [True] * 6          # a pad query: every real key before it, and itself


def test_training_pass_skips_nothing_it_needs(tiny, tok):
    """VLM.forward lets the last decoder block compute only each row's supervised positions
    (layout.Targets.queries); loss and logits must equal those taken from the full sequence
    (padded or not)."""
    import torch.nn.functional as F
    import scenes
    data = scenes.SceneDataset(4, "train", 0, "zh", tiny.cfg.vit_image_size)
    b = Collator(tok, tiny.cfg, train=True)([data[i] for i in range(4)])
    keep = b["labels"][:, 1:] != -100
    assert b["targets"].queries.shape[1] < keep.shape[1] / 2             # the skip really happens
    for am in (None, b["attention_mask"]):
        loss, logits = tiny(b["input_ids"], b["pixels"], b["labels"], am)
        positions, mask = positions_and_mask(am, b["input_ids"].shape)
        h = tiny.lm(tiny.embed(b["input_ids"], b["pixels"]), positions, mask)   # every position
        full = tiny.lm.logits(h[:, :-1][keep])
        torch.testing.assert_close(logits, full)
        torch.testing.assert_close(loss, F.cross_entropy(full, b["labels"][:, 1:][keep]))
        # the collator's layout (computed on the CPU, layout.py) gives the very same pass
        loss2, logits2 = tiny(b["input_ids"], b["pixels"], attention_mask=am, image_pos=b["image_pos"],
                              targets=b["targets"])
        torch.testing.assert_close(logits2, full)
        torch.testing.assert_close(loss2, loss)


def test_cpu_attention_under_bf16_autocast_runs_in_fp32():
    """torch's CPU attention is ~3x slower in bf16 (its backward): under bf16 autocast model.attend
    computes it in fp32 from the bf16 inputs, and its gradients flow back to them."""
    from model import attend
    q, k, v = (torch.randn(2, 4, 7, 8).to(torch.bfloat16).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, is_causal=True)
    assert out.dtype == torch.float32
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.allclose(out, want, atol=1e-6)
    out.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_configs_saved_before_the_layout_field_build_the_clip_layout(tok):
    """A checkpoint's config from before vit_layout existed still builds the model it was: CLS,
    pre-LayerNorm, exact GELU; new configs build the SigLIP layout (no CLS, tanh GELU)."""
    new = tiny_config(tok)
    old = VLMConfig.from_dict({k: v for k, v in new.to_dict().items() if k != "vit_layout"})
    assert (new.vit_layout, old.vit_layout) == ("siglip", "clip") and VLMConfig.from_dict(new.to_dict()) == new
    for cfg, cls, gelu in ((new, False, "tanh"), (old, True, "none")):
        m = VLM(cfg)
        assert m.vision.has_cls == cls == hasattr(m.vision, "cls") and m.projector.gelu == m.vision.blocks[0].gelu == gelu
        assert m.vision(torch.zeros(2, 3, cfg.vit_image_size, cfg.vit_image_size)).shape == (2, cfg.image_tokens, cfg.vit_dim)
