"""The speed benchmarks still run end to end and report what docs/benchmarks.md quotes (one short
round each; the figures themselves are measured by `make bench`, not here)."""
import json
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
