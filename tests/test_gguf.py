"""export_gguf.py: llama.cpp (through llama-cpp-python, a dev requirement) loads the exported
model + mmproj, tokenizes and renders prompts as we do, and answers greedily token for token
as our model does; q8_0 and q4_k_m load and run."""
from pathlib import Path

import pytest
import torch

import backbones
import export_gguf
import gguf_export
import scenes
import tiny_hf
from checkpoint import load_checkpoint, save_checkpoint
from errors import UserError
from llama_runner import LlamaCpp, ours
from model import VLM
from tests.conftest import tiny_config
from tests.test_export import perturbed

PROMPT = scenes.CAPTION_PROMPTS["zh"][0]


def export(checkpoint, out, capsys, quant="f16") -> str:
    """Run the command; returns what it printed."""
    export_gguf.main(["--checkpoint", str(checkpoint), "--output", str(out), "--quant", quant])
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    """A tiny built-in model with weights far from init: its greedy answers vary (a random model's
    repeat one token). Weights much further off make near-ties that f16 rounding decides."""
    path = tmp_path_factory.mktemp("gguf") / "m.pt"
    torch.manual_seed(2)
    model = VLM(tiny_config(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_checkpoint(path, model, tok)
    return path


@pytest.fixture(scope="module")
def f16(trained):
    out = trained.parent / "f16"
    export_gguf.main(["--checkpoint", str(trained), "--output", str(out)])
    return out


def scene(i, size):
    objs, rng = scenes.make_scene(0, "test", i)
    return scenes.render(objs, rng, size)


def test_export_writes_model_mmproj_modelfile_and_readme(f16):
    assert sorted(p.name for p in f16.iterdir()) == ["Modelfile", "README.md", "mmproj-f16.gguf", "model-f16.gguf"]
    modelfile = (f16 / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\nFROM ./mmproj-f16.gguf" in modelfile and "PARAMETER temperature 0" in modelfile
    readme = (f16 / "README.md").read_text()
    assert "llama-mtmd-cli -m model-f16.gguf --mmproj mmproj-f16.gguf --jinja" in readme and "ollama create" in readme
    assert gguf_export.contents(f16 / "model-f16.gguf") == {"F16": 15, "F32": 5}      # matrices f16, norms f32


def test_f16_answers_token_for_token_like_ours(trained, f16):
    model, tok, _ = load_checkpoint(trained)
    size = model.cfg.vit_image_size
    llama = LlamaCpp(f16 / "model-f16.gguf", f16 / "mmproj-f16.gguf")
    answers = []
    try:
        for i, content in enumerate([[{"type": "image"}, {"type": "text", "text": PROMPT}],
                                     [{"type": "text", "text": PROMPT}, {"type": "image"}],     # text first
                                     [{"type": "image"}, {"type": "text", "text": "左上方是什么颜色的？"}]]):
            messages, images = [{"role": "user", "content": content}], [scene(i, size)]
            plain = "<image>" + next(p["text"] for p in content if p["type"] == "text")
            expected = tok.encode_chat([{"role": "user", "content": plain}], model.cfg.image_tokens, 1, True)[0]
            assert llama.prompt_ids(messages, images, tok.image_id) == expected
            theirs, _ = llama.greedy(messages, images, 24)
            mine = ours(model, tok, messages, images, 24)
            assert theirs == mine, (i, tok.decode(theirs), tok.decode(mine))
            answers += mine
    finally:
        llama.close()
    assert len(set(answers)) > 5


@pytest.mark.parametrize("text", ["左上方是一个红色的圆形。", "A red circle at the top left.", "  红色  的\n三角形 ",
                                  "emoji 🙂🐱👍🏽 混合 text ©，全角！", "生僻字：龘靐齉 ㄅ한국어", "</s><image> plain"])
def test_llama_cpp_tokenizes_like_ours(f16, tok, text):
    import llama_cpp
    llm = llama_cpp.Llama(str(f16 / "model-f16.gguf"), n_ctx=64, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
        assert llm.detokenize(tok.encode(text)).decode() == text
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantised_exports_load_and_answer(trained, f16, quant, capsys):
    out = trained.parent / quant
    printed = export(trained, out, capsys, quant)
    mmproj = "mmproj-q8_0.gguf" if quant == "q8_0" else "mmproj-f16.gguf"
    assert (out / f"model-{quant}.gguf").stat().st_size < (f16 / "model-f16.gguf").stat().st_size
    types = gguf_export.contents(out / f"model-{quant}.gguf")
    # q4_k_m: rows 32 wide are too short for K-quants (256): llama.cpp's quantizer falls back, as llama-quantize does
    assert set(types) - {"F32"} == ({"Q8_0"} if quant == "q8_0" else {"Q5_0", "Q8_0"}), types
    assert f"model-{quant}.gguf" in printed
    model, tok, _ = load_checkpoint(trained)
    llama = LlamaCpp(out / f"model-{quant}.gguf", out / mmproj)
    try:
        tokens, _ = llama.greedy([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                 [scene(0, model.cfg.vit_image_size)], 24)
    finally:
        llama.close()
    assert len(set(tokens)) > 2


@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_siglip_and_hf_llm_backbones_export_and_answer_like_ours(tmp_path, llm):
    """Hugging Face parts: a SigLIP tower (its penultimate layer) and a Qwen2 LLM (ChatML template,
    an end-of-turn token, tied head) or a Llama (its own template with a BOS, untied head)."""
    save = {"qwen2": tiny_hf.save_qwen2, "llama": tiny_hf.save_llama}[llm]
    model, tok = backbones.build_vlm(str(tiny_hf.save_siglip(tmp_path / "s")), str(save(tmp_path / "l")))
    perturbed(model)
    gguf_export.export(model, tok, tmp_path / "out", "f16")
    llama = LlamaCpp(tmp_path / "out" / "model-f16.gguf", tmp_path / "out" / "mmproj-f16.gguf")
    try:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片。"}]}]
        images = [scene(0, model.cfg.vit_image_size)]
        expected = tok.encode_chat([{"role": "user", "content": "<image>描述这张图片。"}], model.cfg.image_tokens, 1, True)[0]
        assert llama.prompt_ids(messages, images, tok.image_id) == expected
        assert llama.greedy(messages, images, 8)[0] == ours(model, tok, messages, images, 8)
    finally:
        llama.close()


def test_refuses_what_llama_cpp_cannot_compute_and_leaves_nothing_behind(tok, tmp_path, capsys):
    """A CLS token (the old built-in layout, or a CLIP tower): llama.cpp's LLaVA graph misplaces it."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "old.pt", VLM(tiny_config(tok, vit_layout="clip")), tok)
    with pytest.raises(SystemExit) as e:
        export_gguf.main(["--checkpoint", str(tmp_path / "old.pt"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("错误：") and "CLS" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    clip, t = backbones.build_vlm(str(tiny_hf.save_clip(tmp_path / "c")), base=(VLM(tiny_config(tok)), tok))
    with pytest.raises(UserError, match="CLS"):
        gguf_export.mmproj(tmp_path / "x.gguf", clip, "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_bench_compares_llama_cpp_with_ours_and_reports_speed_and_sizes(trained, capsys):
    """bench/bench_gguf.py end to end, one short round (docs/deploy.md quotes its full run)."""
    import json
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_gguf
    threads = torch.get_num_threads()
    try:
        bench_gguf.main(["--checkpoint", str(trained), "--scenes", "2", "--quants", "f16,q8_0", "--max-new-tokens", "12",
                         "--json"])
    finally:
        torch.set_num_threads(threads)                   # the bench sets its --threads for the process
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["f16"]["token_match"] == 1.0 and 0 <= result["q8_0"]["token_match"] <= 1
    assert result["ours"]["tokens_per_s"] > 0 and result["f16"]["tokens_per_s"] > 0
    assert result["q8_0"]["files"]["model-q8_0.gguf"]["mib"] < result["f16"]["files"]["model-f16.gguf"]["mib"]
