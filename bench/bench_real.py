"""真实训练路径的基准：train_vision_real.py 在现场生成的本地图片文件夹上训练；视觉塔和语言模型是按配置
构建、随机初始化的 Hugging Face 模型（CLIP-B/16 + Qwen2.5-0.5B 的形状，时间够时另有 1.5B、7B），
先 save_pretrained 到临时文件夹，再经 --vision-encoder / --checkpoint 传入，和用户下载的模型一样。
每种训练方式（projector、vision+projector、lora）从小到大扫 batch，直到显存不够；每行报告样本/s、
MFU（对 GPU 的规格峰值和本次实测的 bf16 矩阵乘峰值）、最大已分配 / 已保留显存。由 bench/gpu.sh 调用。

    .venv/bin/python bench/bench_real.py --out bench/results             # GPU，约 5 分钟（--budget 秒）
    .venv/bin/python bench/bench_real.py --smoke --out /tmp/real         # CPU：极小的形状，只验证能跑通

Each row is train_vision_real.main() itself, in one child process per sweep (a sweep past its
time is killed; finished rows are already on disk): after `warm` steps, `steps` steps are timed
between two synchronisations, then the run is stopped. Model FLOPs per sample count the vision
tower, projector and LLM with the passes each needs (bench_train.train_flops_per_sample), logits
on supervised positions only, at the mean unpadded length of the timed batches.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

SPEC_BF16_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "4090": 165}
CLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=16)
QWEN = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
LLMS = {  # Qwen2.5 shapes (config.json of each)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **QWEN),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **QWEN),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, **QWEN),
    "tiny": {},                                                   # tests/tiny_hf.py's defaults
}
PASSES = {"projector": (1, 3, 2), "vision+projector": (3, 3, 2), "lora": (3, 3, 2)}   # (vision, projector, LLM)
# (LLM, --train ways, batches, seconds at most), one child process each, run while at least half
# its seconds are left: the model first (doubling the batch), then coarser sweeps
GPU_PLAN = [("0.5b", ["vision+projector"], [16, 32, 64, 128, 256, 512, 1024], 100),
            ("0.5b", ["projector"], [32, 128, 512, 1024], 50), ("0.5b", ["lora"], [32, 128, 512, 1024], 50),
            ("1.5b", ["vision+projector"], [64, 256], 50), ("7b", ["vision+projector"], [32, 128], 100)]
SMOKE_PLAN = [("tiny", list(PASSES), [2, 4], 150)]
WARM_STEPS = {"gpu": (3, 5), "smoke": (1, 1)}          # untimed steps, then timed ones, per row
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "the", "left", "right", "top", "two",
         "there", "is", "in", "picture", "squares", "at"]


def make_folder(path: Path, images: int, side: int = 256):
    """`images` JPEGs of coloured shapes with two captions each (captions.json), 10-20 words."""
    from PIL import Image, ImageDraw
    rng = random.Random(0)
    (path / "images").mkdir(parents=True, exist_ok=True)
    caps = {}
    for i in range(images):
        img = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.randrange(side - 40), rng.randrange(side - 40)
            draw.ellipse((x, y, x + 40, y + 40), fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(path / "images" / f"{i:05d}.jpg", quality=85)
        caps[f"{i:05d}.jpg"] = [" ".join(rng.choices(WORDS, k=rng.randint(10, 20))) for _ in range(2)]
    (path / "captions.json").write_text(json.dumps(caps))


# ----------------------------------------------------------------------------- one sweep (child)

class Measured(Exception):
    """Raised from the timed steps once they are done: the run stops there."""


def timed_steps(stats: dict, warm: int, steps: int, wait):
    """A Trainer.train_batch that times steps warm..warm+steps and keeps their batches' masks."""
    import trainer
    plain = trainer.Trainer.train_batch

    def train_batch(self, batch, sync):
        n = stats["calls"]
        if n == warm:
            wait()
            stats["t0"] = time.perf_counter()
        if n >= warm:
            stats["masks"].append((batch["attention_mask"], batch["labels"]))
        out = plain(self, batch, sync=sync)
        stats["calls"] = n + 1
        if n + 1 == warm + steps:
            wait()
            stats["t1"], stats["model"] = time.perf_counter(), self.model
            raise Measured
        return out
    return train_batch


def run_row(argv: list[str], mode: str, batch: int, warm: int, steps: int, device: str) -> dict:
    """One train_vision_real.py run at `batch`: samples/s, model FLOP/s, memory (or "OOM")."""
    import torch
    import train_vision_real
    import trainer
    from bench_train import train_flops_per_sample
    cuda = device.startswith("cuda")
    stats = {"calls": 0, "masks": []}
    trainer.Trainer.train_batch = timed_steps(stats, warm, steps, torch.cuda.synchronize if cuda else (lambda: None))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"train": mode, "batch": batch}
    try:
        train_vision_real.main(argv + ["--train", mode, "--batch-size", str(batch)])
        return {**row, "error": "数据不够这么多步"}
    except Measured:
        pass
    except (torch.OutOfMemoryError, RuntimeError) as e:          # cuBLAS and others word it their own way
        if "out of memory" not in str(e).lower() and not isinstance(e, torch.OutOfMemoryError):
            raise
        return {**row, "error": "OOM"}
    seq = sum(float(m.sum()) for m, _ in stats["masks"]) / (batch * steps)
    supervised = sum(float((lab != -100).sum()) for _, lab in stats["masks"]) / (batch * steps)
    rate = batch * steps / (stats["t1"] - stats["t0"])
    flops = train_flops_per_sample(stats["model"].cfg, round(seq), supervised, PASSES[mode])
    row.update(samples_per_s=round(rate, 2), tflops=round(rate * flops / 1e12, 6), seq=round(seq, 1),
               gflop_per_sample=round(flops / 1e9, 1))
    if cuda:
        row.update(max_allocated_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                   max_reserved_gib=round(torch.cuda.max_memory_reserved() / 2 ** 30, 2))
    return row


def sweep(spec: dict):
    """A child: makes the LLM folder if it is missing, then for each --train way runs spec's
    batches in order, one JSON line per row appended to spec["rows"], up to the first OOM."""
    import gc
    import torch
    import tiny_hf
    lm_dir = Path(spec["lm_dir"])
    if not (lm_dir / "config.json").exists():
        big = spec["device"].startswith("cuda")
        tiny_hf.save_qwen2(lm_dir, device=spec["device"] if big else "cpu",
                           dtype=torch.bfloat16 if big else torch.float32, **LLMS[spec["llm"]])
        gc.collect()
        if big:
            torch.cuda.empty_cache()
    argv = ["--data-source", "local", "--data-path", spec["folder"], "--vision-encoder", spec["clip_dir"],
            "--checkpoint", str(lm_dir), "--epochs", "1", "--eval-size", "0", "--val-ratio", "0", "--lr", "1e-4",
            "--device", spec["device"], "--precision", "bf16", "--output", spec["output"], "--overwrite"]
    for mode in spec["trains"]:
        for batch in spec["batches"]:
            row = {"llm": spec["llm"], **run_row(argv, mode, batch, spec["warm"], spec["steps"], spec["device"])}
            with open(spec["rows"], "a") as f:
                f.write(json.dumps(row) + "\n")
            gc.collect()
            if row.get("error") == "OOM":
                break


# ----------------------------------------------------------------------------- the whole run (parent)

def peaks(device: str) -> dict:
    """The GPU's spec bf16 peak (if known) and a measured bf16 matmul peak, in TFLOP/s."""
    import torch
    from devices import matmul_rate
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    n = 8192 if device.startswith("cuda") else 512
    measured = matmul_rate(torch.bfloat16, torch.device(device), n, reps=10 if n > 512 else 2, m=n) / 1e3
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"device": name, "spec_tflops": spec, "matmul_tflops": float(f"{measured:.3g}")}   # a CPU: ~0.01


def run_plan(plan, work: Path, device: str, warm: int, steps: int, budget: float) -> tuple[list, list]:
    """Every sweep of `plan` in its own child, each within its own limit and the time left."""
    rows_file, start, skipped = work / "rows.jsonl", time.monotonic(), []
    for llm, modes, batches, limit in plan:
        left, what = budget - (time.monotonic() - start), f"{llm} {'、'.join(modes)}"
        if left < limit / 2:
            skipped.append(f"{what}：时间不够，没有测")
            continue
        spec = {"llm": llm, "trains": modes, "batches": batches, "device": device, "warm": warm, "steps": steps,
                "folder": str(work / "data"), "clip_dir": str(work / "clip"), "lm_dir": str(work / f"qwen-{llm}"),
                "output": str(work / "out" / "m.pt"), "rows": str(rows_file)}
        try:
            subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], timeout=min(limit, left),
                           check=True, capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:          # what it printed last says where it was
            said = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (e.stdout, e.stderr))
            skipped.append(f"{what}：超过 {min(limit, left):.0f} 秒，后面的 batch 没有测；最后的输出：{said.strip()[-400:]}")
        except subprocess.CalledProcessError as e:
            skipped.append(f"{what}：子进程出错（退出码 {e.returncode}）：{e.stderr.strip()[-600:]}")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    return rows, skipped


def table(result: dict) -> str:
    """The markdown table docs/benchmarks.md quotes."""
    spec = result["spec_tflops"]
    lines = [f"设备：{result['device']}；bf16 峰值：规格 {spec or '未知'} TFLOP/s，实测矩阵乘 {result['matmul_tflops']} TFLOP/s",
             "", "| 语言模型 | --train | batch | 样本/s | MFU（规格） | MFU（实测峰值） | 最大已分配 GiB | 最大保留 GiB | 序列长度 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['llm']} | {r['train']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        mfu = lambda k: f"{r[k]:.1%}" if k in r else "—"
        lines.append(f"| {r['llm']} | {r['train']} | {r['batch']} | {r['samples_per_s']:.1f} | {mfu('mfu_spec')} | "
                     f"{mfu('mfu_matmul')} | {r.get('max_allocated_gib', '—')} | "
                     f"{r.get('max_reserved_gib', '—')} | {r['seq']:.0f} |")
    return "\n".join(lines + [f"- {s}" for s in result["skipped"]]) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU 上用极小的形状跑同样的代码路径")
    p.add_argument("--out", default="bench/results", help="结果文件夹：real.json 和 real.md (默认: bench/results)")
    p.add_argument("--budget", type=float, default=300, help="所有扫描合计最多用多少秒 (默认: 300)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return sweep(json.loads(a.child))
    import tiny_hf
    device, plan = ("cpu", SMOKE_PLAN) if a.smoke else ("cuda", GPU_PLAN)
    warm, steps = WARM_STEPS["smoke" if a.smoke else "gpu"]
    t = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        make_folder(work / "data", max(max(b) for _, _, b, _ in plan) * (warm + steps), 64 if a.smoke else 224)
        tiny_hf.save_clip(work / "clip", **({} if a.smoke else CLIP_B16))
        result = peaks(device)
        rows, skipped = run_plan(plan, work, device, warm, steps, a.budget)
    for r in rows:
        if "tflops" in r:
            r.update({f"mfu_{k}": round(r["tflops"] / result[f"{k}_tflops"], 6) for k in ("spec", "matmul")
                      if result[f"{k}_tflops"]})
    result.update(rows=rows, skipped=skipped, elapsed_s=round(time.monotonic() - t))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    (out / "real.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
