"""The speed benchmarks still run end to end and report what docs/benchmarks.md quotes (one short
round each; the figures themselves are measured by `make bench`, not here)."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--threads", "1", "--json", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_bench_compares_the_same_network_and_reports_its_ceiling():
    r = run_bench("bench_train.py", "--rounds", "1", "--steps", "1", "--batch", "4", "--no-memory")
    ours, hf = r["initial_loss"]
    assert abs(ours - hf) < 1e-3                         # same weights, same loss before training
    for name in ("ours", "transformers"):
        assert r[name]["samples_per_s"] > 0 and 0 < r[name]["mfu"] < 1.5
    assert r["ceiling"]["max_samples_per_s"] > r["ours"]["samples_per_s"] * 0.5
    assert r["speedup"]["ours"] > 0


def test_generation_bench_checks_identical_tokens_and_reports_its_floor():
    r = run_bench("bench_generate.py", "--rounds", "1", "--batches", "1", "--new-tokens", "4")
    (b,) = r["results"]
    assert b["same_tokens"] is True and b["new_tokens"] == 4
    assert b["ours"]["tokens_per_s"] > 0 and b["transformers"]["tokens_per_s"] > 0
    assert b["floor"]["per_token_ms"] > 0 and b["floor"]["vs_transformers"] > 0
    assert b["ours"]["peak_mib"] > 0 and b["transformers"]["peak_mib"] > 0     # each in its own process


def test_gpu_check_script_runs_its_code_paths_on_the_cpu(tmp_path):
    """bench/gpu.sh --smoke: the GPU check's steps at tiny shapes on this CPU, so the script
    that waits for a lent GPU is known to run end to end; the real path (train_vision_real.py on a
    generated folder) sweeps two batches for each --train way; the vLLM comparison runs its
    serve.py half (vLLM itself needs a GPU) on the bf16 export it gives vLLM."""
    import os
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    real = json.loads((tmp_path / "real.json").read_text())
    assert [(r["train"], r["batch"]) for r in real["rows"]] == [(t, b) for t in ("projector", "vision+projector", "lora")
                                                                for b in (2, 4)], real
    assert all(r["samples_per_s"] > 0 and r["tflops"] > 0 and r["mfu_matmul"] > 0 for r in real["rows"])
    assert (tmp_path / "real.md").read_text().count("| tiny |") == 6
    sizes = json.loads((tmp_path / "gpu_sizes.json").read_text())
    assert [r["size"] for r in sizes["rows"]] == ["tiny", "small", "clip-b16+qwen2-0.5b"]
    assert all(r[m]["samples_per_s"] > 0 for r in sizes["rows"] for m in ("ours", "transformers"))
    assert json.loads((tmp_path / "gpu_train.json").read_text())["speedup"]["ours"] > 0
    assert json.loads((tmp_path / "gpu_generate.json").read_text())["results"][0]["same_tokens"] is True
    served = json.loads((tmp_path / "gpu_vllm.json").read_text())["serve.py"]
    assert 0 < served["tokens"] <= 4 * 4 and served["tokens_per_s"] > 0    # 4 requests, max_tokens 4
    assert "用时" in (tmp_path / "gpu.log").read_text()


def test_pipeline_bench_measures_its_three_paths():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--threads", "1", "--images", "8",
                          "--photo", "64x48", "--rounds", "1", "--workers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("8 张 64×48 JPEG")
    rows = [l for l in out.stdout.splitlines() if l.startswith("| ") and "图片/s" not in l and "---" not in l]
    assert len(rows) == 3 and all(float(l.split("|")[2]) > 0 for l in rows), out.stdout


def test_packing_bench_checks_equal_losses_and_reports_fewer_positions():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_packing.py"), "--threads", "1", "--preset", "micro",
                          "--batch", "16", "--steps", "2", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "首批损失两边相同" in out.stdout
    rows = {l.split("|")[1].strip(): l.split("|") for l in out.stdout.splitlines() if l.startswith("| pa")}
    assert set(rows) == {"padded", "packed"}
    assert float(rows["packed"][2]) < float(rows["padded"][2])                # fewer token positions a step
    assert all(float(r[3]) > 0 for r in rows.values())
    assert re.search(r"packed 比 padded 快 [0-9.]+ 倍", out.stdout), out.stdout


def test_words_bench_checks_same_conversations_and_reports_fewer_tokens():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_words.py"), "--threads", "1", "--preset", "micro",
                          "--batch", "16", "--steps", "2", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "两边的批次解码后相同" in out.stdout
    rows = {l.split("|")[1].strip(): [float(x) for x in l.split("|")[2:6]] for l in out.stdout.splitlines()
            if l.startswith(("| chars", "| words"))}
    assert set(rows) == {"chars", "words"}
    assert rows["words"][1] < 0.85 * rows["chars"][1] and rows["words"][2] < 0.7 * rows["chars"][2]   # positions, targets
    assert all(r[3] > 0 for r in rows.values())
    assert re.search(r"words 比 chars 快 [0-9.]+ 倍", out.stdout), out.stdout


def test_presets_bench_times_both_sizes_on_the_same_scenes():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_presets.py"), "--threads", "1", "--presets", "micro",
                          "micro", "--muon-steps", "5", "1", "--batch", "4", "--steps", "1", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {l.split("|")[1].strip(): l.split("|") for l in out.stdout.splitlines() if l.startswith("| micro")}
    assert set(rows) == {"micro/5", "micro/1"} and rows["micro/5"][2] == rows["micro/1"][2]    # same parameters
    assert all(float(r[3]) > 0 for r in rows.values())
    assert re.search(r"micro/1 比 micro/5 快 [0-9.]+ 倍", out.stdout), out.stdout


def test_optim_bench_times_each_optimizer_side_by_side():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_optim.py"), "--threads", "1", "--preset", "micro",
                          "--steps", "2", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {l.split("|")[1].strip(): float(l.split("|")[2]) for l in out.stdout.splitlines()
            if l.startswith("| ") and "毫秒" not in l and "---" not in l}
    assert set(rows) == {"fused AdamW, all", "torch.optim.Muon + AdamW", "optim.Muon + AdamW", "optim.Muon (fp32) + AdamW"}
    assert all(v > 0 for v in rows.values()) and re.search(r"快 [0-9.]+ 倍", out.stdout), out.stdout
