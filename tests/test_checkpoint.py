import pickle

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError


def test_round_trip_under_weights_only(tiny, tok, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny, tok, {"lang": "zh"})
    raw = torch.load(path, weights_only=True)                     # plain tensors and strings only
    assert raw["format"] == "vlm-checkpoint" and raw["meta"] == {"lang": "zh"}
    model, tok2, meta = load_checkpoint(path)
    ids = torch.tensor([[tok.bos_id] + tok.encode("你好")])
    torch.testing.assert_close(model(ids)[1], tiny(ids)[1], rtol=0, atol=0)
    assert tok2.encode("红色的圆形") == tok.encode("红色的圆形")
    assert not list(tmp_path.glob(".*tmp*"))                      # no temp file left behind


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/vlm_payload_ran",))


@pytest.mark.parametrize("kind", ["missing", "garbage", "foreign", "truncated", "malicious"])
def test_bad_files_are_refused_with_a_clear_message(tiny, tok, tmp_path, kind):
    import os
    path = tmp_path / "bad.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "foreign":
        torch.save({"state_dict": tiny.state_dict()}, path)
    elif kind == "truncated":
        save_checkpoint(path, tiny, tok)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "malicious":
        if os.path.exists("/tmp/vlm_payload_ran"):
            os.remove("/tmp/vlm_payload_ran")
        with open(path, "wb") as f:
            torch.save({"format": "vlm-checkpoint", "x": Payload()}, f, pickle_module=pickle)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and len(msg.splitlines()) == 1
    assert not os.path.exists("/tmp/vlm_payload_ran")


def test_weights_that_do_not_fit_the_config_are_refused(tiny, tok, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny, tok)
    obj = torch.load(path, weights_only=True)
    obj["config"]["lm_dim"] = 64
    torch.save(obj, path)
    with pytest.raises(UserError, match="权重与模型结构不符"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["jpeg", "random", "version", "symlink"])
def test_a_file_that_is_not_ours_is_named_for_what_it_is(tiny, tok, tmp_path, kind):
    """A JPEG renamed to .pt or random bytes is 'not a PyTorch file', not 'unsafe code'; a
    non-integer version is a clear line, not a TypeError."""
    import io
    from PIL import Image
    path = tmp_path / "m.pt"
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue())
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "symlink":                               # a link to a text file
        (tmp_path / "notes.txt").write_text("模型在另一台机器上\n")
        path.symlink_to(tmp_path / "notes.txt")
    else:
        save_checkpoint(path, tiny, tok)
        obj = torch.load(path, weights_only=True)
        torch.save({**obj, "version": "1.0"}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "不安全" not in msg and str(path) in msg and len(msg.splitlines()) == 1
    assert ("版本号" in msg) if kind == "version" else ("不是 PyTorch 文件" in msg)


@pytest.mark.parametrize("key, value", [("lm_max_len", 10 ** 12), ("lm_layers", 10 ** 6), ("lm_dim", "256"),
                                        ("lm_vocab_size", 0), ("lm_rope_theta", float("nan"))])
def test_a_config_out_of_sane_bounds_is_refused_before_allocating(tiny, tok, tmp_path, key, value):
    """A checkpoint's config alone must not make start-up allocate terabytes (a 10^12 context)."""
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny, tok)
    obj = torch.load(path, weights_only=True)
    obj["config"][key] = value
    torch.save(obj, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert key in msg and str(path) in msg and len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize("train,weights", [("projector", "delta"), ("lora", "delta"), ("projector", "full")])
def test_bf16_training_holds_a_frozen_base_in_bf16_and_its_delta_checkpoint_loads(train, weights, tmp_path):
    """A base the checkpoint does not store is held in bf16 while training in bf16 (no fp32
    original beside autocast's copies); the trained parts stay fp32, and the saved delta still
    matches its fp32 base on load. A full checkpoint stores the base, so it stays fp32."""
    import backbones
    import scenes
    import tiny_hf
    from collate import Collator
    from trainer import TrainConfig, Trainer
    model, tok = backbones.build_vlm(str(tiny_hf.save_clip(tmp_path / "clip")), str(tiny_hf.save_llama(tmp_path / "llama")))
    backbones.configure_training(model, train, 1e-3, lora_r=4)
    data = scenes.SceneDataset(16, "train", 0, "en", model.cfg.vit_image_size)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, output=str(tmp_path / "m.pt"), precision="bf16", workers=0,
                      feature_cache_gb=0)
    trainer = Trainer(model, tok, data, Collator(tok, model.cfg), cfg, val_data=data, meta={"weights": weights},
                      log=lambda *a: None)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.ndim >= 2}
    assert frozen == ({torch.bfloat16} if weights == "delta" else {torch.float32})
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    trainer.fit()
    assert trainer.best < 20
    loaded, _, _ = load_checkpoint(tmp_path / "m.pt")                 # the base's fingerprint checks out
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
