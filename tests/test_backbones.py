"""Pretrained backbones: tiny random CLIP / SigLIP towers and Llama / Qwen2 LLMs saved to folders
like a user's downloads, trained through the real CLI in every training choice, reloaded, served."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import backbones
import tiny_hf
from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError
from optim import param_groups

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders: llama, qwen2, clip, siglip (+ data: 16 captioned images)."""
    d = tmp_path_factory.mktemp("hf")
    paths = {"llama": tiny_hf.save_llama(d / "llama"), "qwen2": tiny_hf.save_qwen2(d / "qwen2"),
             "clip": tiny_hf.save_clip(d / "clip"), "siglip": tiny_hf.save_siglip(d / "siglip")}
    data = d / "data"
    (data / "images").mkdir(parents=True)
    caps = {}
    for i in range(16):
        colour = ["red", "green", "blue", "white"][i % 4]
        Image.new("RGB", (40 + i, 36), colour).save(data / "images" / f"{i}.png")
        caps[f"{i}.png"] = f"a {colour} picture"
    (data / "captions.json").write_text(json.dumps(caps))
    paths["data"] = data
    return {k: str(v) for k, v in paths.items()}


def run_cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "train_vision_real.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def state_of(folder, cls_name):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(folder).state_dict()


def changed(part_state: dict, base_state: dict) -> bool:
    """True if any base weight differs in the trained part (keys matched by suffix)."""
    for k, v in base_state.items():
        mine = [w for name, w in part_state.items() if name.replace(".base_layer", "").endswith(k) and "lora" not in name]
        assert mine, k
        if not torch.equal(mine[0], v):
            return True
    return False


def serve_one(checkpoint, image: Image.Image, question: str) -> dict:
    """One OpenAI-style chat request to serve.py's app (in-process, with its engine)."""
    import base64
    import io
    from fastapi.testclient import TestClient
    import serve
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    app = serve.create_app(serve.settings_from(serve.build_parser().parse_args(["--checkpoint", str(checkpoint)])))
    app.state.server.on_fatal = lambda: None
    with TestClient(app) as client:
        end = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < end and not app.state.server.failed, "model did not load"
            time.sleep(0.05)
        r = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("vision, llm, train, save", [
    ("clip", "llama", "projector", "delta"),
    ("siglip", "qwen2", "vision+projector", "full"),
    ("clip", "qwen2", "lora", "delta"),
    ("siglip", "llama", "all", "full"),
])
def test_cli_trains_each_choice_saves_reloads_and_serves(hf, tmp_path, vision, llm, train, save):
    out = tmp_path / "m.pt"
    extra = ["--gradient-checkpointing"] if train == "all" else []
    r = run_cli("--data-source", "local", "--data-path", hf["data"], "--checkpoint", hf[llm], "--vision-encoder", hf[vision],
                "--train", train, f"--save-{save}", "--epochs", "1", "--batch-size", "4", "--eval-size", "0",
                "--lr", "1e-2", "--backbone-lr", "1e-2", "--lora-r", "4", "--output", str(out), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"训练方式 {train}" in r.stdout and "训练完成" in r.stdout
    obj = torch.load(out, weights_only=True)
    assert obj["backbones"]["stored"] == save and obj["meta"]["train"] == train
    stored = set(obj["model"])
    assert any(k.startswith("projector.") for k in stored)
    assert any(k.startswith("vision.") for k in stored) == (save == "full" or train != "projector")
    assert any(k.startswith("lm.") for k in stored) == (save == "full" or train in ("lora", "all"))

    model, tok, meta = load_checkpoint(out)
    assert meta["weights"] == save
    vision_cls = "CLIPVisionModel" if vision == "clip" else "SiglipVisionModel"
    lm_cls = "LlamaForCausalLM" if llm == "llama" else "Qwen2ForCausalLM"
    assert changed(model.vision.model.state_dict(), state_of(hf[vision], vision_cls)) == (train != "projector")
    base_lm = {k: v for k, v in state_of(hf[llm], lm_cls).items() if "embed_tokens" not in k and "lm_head" not in k}
    assert changed(model.lm.model.state_dict(), base_lm) == (train == "all")
    if train == "lora":
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.lm.model.state_dict().items())
    reply = serve_one(out, Image.new("RGB", (50, 40), "red"), "What is in the picture?")
    assert reply["usage"]["completion_tokens"] >= 1 and isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["prompt_tokens"] > model.cfg.image_tokens       # the image's tokens were in the prompt


def test_hub_id_offline_fails_fast_with_one_chinese_line(hf, tmp_path, monkeypatch):
    t = time.monotonic()
    r = run_cli("--data-source", "local", "--data-path", hf["data"], "--vision-encoder", "openai/clip-vit-base-patch16",
                "--checkpoint", hf["llama"], "--output", str(tmp_path / "m.pt"), timeout=60)
    elapsed = time.monotonic() - t
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("错误：") and "openai/clip-vit-base-patch16" in lines[0] and "离线模式" in lines[0]
    assert "hf download" in lines[0] and "文件夹" in lines[0] and "HF_ENDPOINT" in lines[0]
    assert elapsed < 30, elapsed                     # most of it is importing torch and transformers
    # without HF_HUB_OFFLINE, an unreachable hub switches to the local cache instead of retrying for ~30 s
    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("hub.hub_reachable", lambda: False)
    t = time.monotonic()
    with pytest.raises(UserError, match=r"Qwen/Qwen2\.5-0\.5B-Instruct.*HF_ENDPOINT"):
        backbones.build_vlm(hf["clip"], "Qwen/Qwen2.5-0.5B-Instruct")
    assert time.monotonic() - t < 5 and os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_weight_is_an_error_naming_the_key(hf, tmp_path):
    import shutil
    broken = tmp_path / "llama"
    shutil.copytree(hf["llama"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        backbones.build_vlm(hf["clip"], str(broken))


def test_tower_from_a_full_clip_folder_and_missing_local_folder(hf, tmp_path):
    full = tiny_hf.save_clip(tmp_path / "clip_full", full=True)       # like openai/clip-vit-base-patch16
    model, tok = backbones.build_vlm(str(full), hf["llama"])
    assert model.cfg.vit_image_mean[0] == pytest.approx(0.48145466) and model.cfg.image_tokens == 16
    assert model.vision(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 32)    # CLS dropped
    with pytest.raises(UserError, match="找不到"):
        backbones.build_vlm(str(tmp_path / "nope"), hf["llama"])


def test_feature_layer_is_penultimate_by_default(hf):
    from transformers import SiglipVisionModel
    model, _ = backbones.build_vlm(hf["siglip"], hf["qwen2"])
    pixels = torch.randn(1, 3, 32, 32)
    hidden = SiglipVisionModel.from_pretrained(hf["siglip"])(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert torch.allclose(model.vision(pixels), hidden[-2], atol=1e-6)     # SigLIP: no CLS to drop
    assert not torch.allclose(hidden[-2], hidden[-1])
    backbones.configure_training(model, "vision+projector", 1e-3)
    layers = model.vision.model.encoder.layers
    assert all(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in layers[-1].parameters())          # above the feature layer: frozen
    assert not any(p.requires_grad for p in model.vision.model.head.parameters())
    with pytest.raises(UserError, match="--vision-layer"):
        backbones.build_vlm(hf["siglip"], hf["qwen2"], vision_layer=9)


def test_our_checkpoint_as_the_llm_with_a_clip_tower(hf, tok, tmp_path):
    from model import VLM
    from tests.conftest import tiny_config
    torch.manual_seed(0)
    ours = VLM(tiny_config(tok))
    model, t = backbones.build_vlm(hf["clip"], base=(ours, tok))
    assert t is tok and model.lm is ours.lm and model.cfg.lm_dim == ours.cfg.lm_dim and model.cfg.vit_dim == 32
    backbones.configure_training(model, "vision+projector", 1e-3)
    for weights in ("delta", "full"):
        save_checkpoint(tmp_path / f"{weights}.pt", model, tok, {"weights": weights})
        reloaded, _, _ = load_checkpoint(tmp_path / f"{weights}.pt")
        ids, _ = tok.encode_chat([{"role": "user", "content": "描述这张图片。"}], model.cfg.image_tokens, 1, True)
        pixels = torch.randn(1, 3, 32, 32)
        assert torch.equal(reloaded(torch.tensor([ids]), pixels)[1], model.eval()(torch.tensor([ids]), pixels)[1])


def test_parts_declare_what_they_have(hf, tok):
    """model.py, engine.py, export_hf.py and checkpoint.py ask a part what it has, never its type."""
    from model import VLM
    from tests.conftest import tiny_config
    ours = VLM(tiny_config(tok))
    clip_qwen, _ = backbones.build_vlm(hf["clip"], hf["qwen2"])
    siglip, _ = backbones.build_vlm(hf["siglip"], base=(ours, tok))
    assert (ours.vision.has_cls, ours.vision.feature_layer, ours.vision.source) == (False, -1, None)
    assert (clip_qwen.vision.has_cls, clip_qwen.vision.feature_layer, clip_qwen.vision.source) == (True, -2, hf["clip"])
    assert not siglip.vision.has_cls and siglip.lm.source is None
    assert (ours.lm.max_len, ours.lm.source) == (ours.cfg.lm_max_len, None)
    assert (clip_qwen.lm.max_len, clip_qwen.lm.source) == (None, hf["qwen2"])
    for lm in (ours.lm, clip_qwen.lm):         # the engine's view of a cache: stacked tensors, and back
        cache = lm.new_cache(2, 8)
        lm(lm.embed(torch.tensor([[5, 6, 7], [8, 9, 10]])), torch.arange(3).expand(2, 3), None, cache)
        k, v, n = cache.stacked()
        assert n == 3 and k.shape[:3] == v.shape[:3] == (2, 2, 2) and k.shape[3] >= 3   # (L, B, H_kv, T, hd)
        second_row = cache.from_stacked(k[:, 1:], v[:, 1:], n)
        step = lm(lm.embed(torch.tensor([[11]])), torch.tensor([[3]]), None, second_row)
        whole = lm(lm.embed(torch.tensor([[8, 9, 10, 11]])), torch.arange(4)[None], None, lm.new_cache(1, 4))
        assert torch.allclose(step[0, -1], whole[0, -1], atol=1e-5)
    for part in (ours.vision, clip_qwen.vision):
        config, weights = part.llava_vision()
        assert weights and config is not None


def test_siglip2_tower_takes_square_images(tmp_path, hf):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=8, num_patches=16)).save_pretrained(tmp_path / "s2")
    model, _ = backbones.build_vlm(str(tmp_path / "s2"), hf["llama"])
    assert model.cfg.vit_image_size == 32 and model.cfg.image_tokens == 16
    assert model.cfg.vit_image_std == (0.5, 0.5, 0.5)            # no preprocessor config: the family's default
    assert model.vision(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)


def test_chat_template_adapter_labels_answers_only(hf):
    model, tok = backbones.build_vlm(hf["clip"], hf["qwen2"])
    chat = [{"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": "a red picture"}]
    ids, labels = tok.encode_chat(chat, image_tokens=16, n_images=1)
    assert ids.count(tok.image_id) == 16 and all(l == -100 for i, l in zip(ids, labels) if i == tok.image_id)
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.hf.decode(answer) == "a red picture<|im_end|>"        # not the newline ChatML writes after it
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    prompt, _ = tok.encode_chat(chat[:1], 16, 1, add_generation_prompt=True)
    assert prompt == ids[:len(prompt)] and tok.hf.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(tok.encode("描述这张图片。")) == "描述这张图片。"
    with pytest.raises(ValueError, match="markers"):
        tok.encode_chat([{"role": "user", "content": "<image><image>hi"}], 16, 1)


def test_delta_checkpoint_refuses_a_changed_base(hf, tmp_path):
    import shutil
    base = tmp_path / "llama"
    shutil.copytree(hf["llama"], base)
    model, tok = backbones.build_vlm(hf["clip"], str(base))
    backbones.configure_training(model, "vision+projector", 1e-3)
    save_checkpoint(tmp_path / "d.pt", model, tok, {"weights": "delta"})
    save_checkpoint(tmp_path / "f.pt", model, tok, {"weights": "full"})
    assert (tmp_path / "d.pt").stat().st_size < (tmp_path / "f.pt").stat().st_size
    tiny_hf.save_llama(base, seed=1)                                   # the base LLM was replaced
    with pytest.raises(UserError, match="基础模型"):
        load_checkpoint(tmp_path / "d.pt")
    shutil.rmtree(base)                                                # a full checkpoint needs no base
    reloaded, _, _ = load_checkpoint(tmp_path / "f.pt")
    ids = torch.tensor([tok.encode("a red picture")])
    assert torch.equal(reloaded(ids)[1], model.eval()(ids)[1])


def test_learning_rates_per_part(hf):
    model, _ = backbones.build_vlm(hf["clip"], hf["llama"])
    backbones.configure_training(model, "lora", lr=1e-3, projector_lr=2e-3, backbone_lr=1e-4, lora_r=4)
    groups = param_groups([model], 0.0)
    by_scale = {}
    for g in groups:
        if g["params"]:
            by_scale.setdefault(g["lr_scale"], []).extend(g["params"])
    assert sorted(by_scale) == pytest.approx([0.1, 2.0])
    assert {id(p) for p in model.projector.parameters()} <= {id(p) for p in by_scale[2.0]}
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if "lora" not in n)
    with pytest.raises(UserError, match="--train lora"):
        from model import VLM, VLMConfig
        backbones.configure_training(VLM(VLMConfig(**{"lm_dim": 32, "lm_hidden": 64})), "lora", 1e-3)


def test_muon_takes_an_hf_llms_hidden_matrices_but_not_its_output_layer(hf):
    from optim import hidden_matrices
    model, _ = backbones.build_vlm(hf["clip"], hf["llama"])
    backbones.configure_training(model, "all", lr=1e-3)
    names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in hidden_matrices(model)}}
    head = model.lm.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and head.weight.requires_grad        # untied, trained, yet AdamW's
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert {"q_proj", "down_proj", "fc1"} <= {n.split(".")[-2] for n in names}    # the LLM's and the tower's


def test_continuing_a_lora_checkpoint_keeps_its_adapters(hf, tmp_path):
    model, tok = backbones.build_vlm(hf["clip"], hf["qwen2"])
    backbones.configure_training(model, "lora", 1e-3, lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_checkpoint(tmp_path / "l.pt", model, tok, {"weights": "delta"})
    again, _, _ = load_checkpoint(tmp_path / "l.pt")
    backbones.configure_training(again, "lora", 1e-3, lora_r=4)
    adapters = {n: p for n, p in again.lm.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert not any(".base_layer.base_layer" in n for n, _ in again.named_parameters())     # not wrapped twice
    assert all(float(p.detach().mean()) == pytest.approx(0.01) for n, p in adapters.items() if "lora_B" in n)
    assert sum(p.requires_grad for p in again.lm.parameters()) == len(adapters)


def test_resume_state_of_a_delta_model_restores_the_trained_weights(hf, tmp_path):
    from collate import Collator
    from trainer import TrainConfig, Trainer
    samples = [{"image": Image.new("RGB", (32, 32), c), "messages": [{"role": "user", "content": "What is in the picture?"},
                                                                    {"role": "assistant", "content": f"a {c} picture"}]}
               for c in ("red", "green", "blue", "white")]

    def trainer():
        model, tok = backbones.build_vlm(hf["clip"], hf["qwen2"])
        backbones.configure_training(model, "lora", 1e-2, lora_r=4)
        cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2, device="cpu", precision="fp32", workers=0,
                          output=str(tmp_path / "m.pt"))
        return Trainer(model, tok, samples, Collator(tok, model.cfg), cfg, meta={"weights": "delta"}, log=lambda *a: None)

    first = trainer()
    first.fit()
    saved = torch.load(tmp_path / "m.resume.pt", weights_only=True)["checkpoint"]
    assert saved["backbones"]["stored"] == "delta" and not any("base_layer" in k for k in saved["model"])
    second = trainer()
    second.cfg.resume = True
    second.load_resume()
    want, got = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want) and second.step == first.step


@pytest.mark.parametrize("train, trains_lm_weights", [("projector+lm", True), ("projector+lora", False)])
def test_stage_two_choices_freeze_the_vision_tower(hf, train, trains_lm_weights):
    model, _ = backbones.build_vlm(hf["clip"], hf["qwen2"])
    backbones.configure_training(model, train, lr=2e-5, backbone_lr=2e-5, lora_r=4)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    lm = dict(model.lm.named_parameters())
    assert any(p.requires_grad for n, p in lm.items() if "lora" not in n) == trains_lm_weights
    assert any("lora" in n for n in lm) == (not trains_lm_weights)
    assert {p.lr_scale for p in model.parameters() if p.requires_grad} == {1.0}


def test_two_stage_recipe_as_documented(hf, tmp_path, capsys, monkeypatch):
    """docs/training.md: stage 1 projector only at 1e-3 on captions, stage 2 from its checkpoint
    with LoRA (vision frozen) on conversations with 0, 1 and 2 images per sample."""
    from test_train_real import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chats = tmp_path / "chats"
    (chats / "images").mkdir(parents=True)
    samples = []
    for i, colour in enumerate(["red", "green", "blue", "white"] * 2):
        Image.new("RGB", (40, 36), colour).save(chats / "images" / f"{i}.png")
        samples.append({"id": f"one-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"a {colour} picture"},
            {"from": "human", "value": "Is it a picture?"}, {"from": "gpt", "value": "Yes."}]})
    samples.append({"id": "two", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich picture is red?"}, {"from": "gpt", "value": "The first one."}]})
    samples.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    (chats / "chat.json").write_text(json.dumps(samples))
    stage1, stage2 = tmp_path / "stage1.pt", tmp_path / "stage2.pt"
    common = ["--epochs", "1", "--batch-size", "4", "--eval-size", "0", "--workers", "0"]
    code, _, err = main([*common, "--data-path", hf["data"], "--vision-encoder", hf["clip"], "--checkpoint", hf["qwen2"],
                         "--train", "projector", "--lr", "1e-3", "--output", str(stage1)], capsys)
    assert code == 0, err[-2000:]
    code, out, err = main([*common, "--data-path", str(chats), "--checkpoint", str(stage1), "--train", "projector+lora",
                           "--lr", "2e-4", "--backbone-lr", "2e-4", "--projector-lr", "2e-5", "--lora-r", "4",
                           "--output", str(stage2)], capsys)
    assert code == 0, err[-2000:]
    assert "训练方式 projector+lora" in out
    first, _, _ = load_checkpoint(stage1)
    model, _, meta = load_checkpoint(stage2)
    assert meta["train"] == "projector+lora"
    assert not changed(model.vision.model.state_dict(), state_of(hf["clip"], "CLIPVisionModel"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.lm.model.state_dict().items())
    assert not torch.equal(model.projector.fc1.weight, first.projector.fc1.weight)     # stage 2 moved on from stage 1
