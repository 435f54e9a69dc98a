"""Image pipeline throughput: the project's data path vs a plain PIL loop, side by side.

    python bench/bench_pipeline.py                      # 300 Flickr-sized JPEGs, 64 px (tiny preset)
    python bench/bench_pipeline.py --size 224 --photo 1024x768 --images 150
    python bench/bench_pipeline.py --folder data/vision_train   # your own images/ + captions.json

Rows, each in images/s, measured in alternating rounds so machine load hits all alike:
  plain      Image.open(p).convert("RGB").resize((S, S), BICUBIC) for every file, one process
  decode     images.decode: JPEG draft-mode decoding at 1/2..1/8 scale before the resize,
             EXIF orientation, RGB conversion (one process)
  loader     the training input as the trainer builds it: CaptionSet -> DataLoader (workers sized
             to the machine, persistent, pinned memory on CUDA) -> Collator (tensors + tokens)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import captions  # noqa: E402
import folders  # noqa: E402
import images  # noqa: E402
from collate import Collator  # noqa: E402
from model import VLMConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from trainer import default_workers  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0, width: int = 500, height: int = 375):
    """Photo-like JPEGs, by default at Flickr's typical 500x375 (smooth gradients + noise, quality 90)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    caps = {}
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(count):
        base = (np.sin(xx / rng.uniform(20, 90) + i) + np.cos(yy / rng.uniform(20, 90))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 18, (height, width, 3)) + rng.integers(-60, 60, 3), 0, 255)
        name = f"img_{i:05d}.jpg"
        Image.fromarray(img.astype(np.uint8)).save(folder / "images" / name, quality=90)
        caps[name] = f"a picture number {i}"
    (folder / "captions.json").write_text(json.dumps(caps), encoding="utf-8")


def plain(paths, size):
    for p in paths:
        Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)


def decode(paths, size):
    for p in paths:
        images.decode(p, size)


def loader_pass(loader):
    n = 0
    for batch in loader:
        n += len(batch["pixels"])
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description="图片数据管道吞吐：本项目的读取路径 vs 朴素的 PIL 打开+缩放循环")
    p.add_argument("--folder", help="已有的数据文件夹（images/ + captions.json）；默认生成合成 JPEG")
    p.add_argument("--images", type=int, default=300, help="生成的图片数（默认 300）")
    p.add_argument("--photo", default="500x375", help="生成图片的尺寸 宽x高（默认 500x375，Flickr 常见大小）")
    p.add_argument("--size", type=int, default=64, help="模型输入边长（默认 64，tiny 预设）")
    p.add_argument("--rounds", type=int, default=3, help="交替轮数（默认 3）")
    p.add_argument("--batch-size", type=int, default=32, help="loader 行的批次大小（默认 32）")
    p.add_argument("--workers", type=int, default=-1, help="loader 行的进程数（默认按机器自动）")
    p.add_argument("--threads", type=int, default=0, help="torch 线程数，0 = torch 默认（机器繁忙时 1 更稳定）")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(a.folder) if a.folder else Path(tmp.name)
    if not a.folder:
        width, height = (int(v) for v in a.photo.lower().split("x"))
        make_images(folder, a.images, width=width, height=height)
    rows = folders.load_local(str(folder))
    paths = [r.path for r in rows.refs if r.path]
    data = captions.CaptionSet(rows, a.size)
    tok = Tokenizer.train([c for cs in rows.captions for c in cs] + captions.PROMPTS, 400)
    cfg = VLMConfig(vit_image_size=a.size, vit_patch_size=16 if a.size % 16 == 0 else a.size, lm_max_len=4096)
    workers = default_workers() if a.workers < 0 else a.workers
    keys = [(0, i) for i in range(len(data))]
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch_size, sampler=keys, collate_fn=Collator(tok, cfg),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=torch.cuda.is_available())
    loader_pass(loader)                                           # warm-up: workers start, files cached
    plain(paths[:20], a.size)
    times = {"plain": [], "decode": [], "loader": []}
    for _ in range(a.rounds):
        for name, fn in (("plain", lambda: plain(paths, a.size)), ("decode", lambda: decode(paths, a.size)),
                         ("loader", lambda: loader_pass(loader))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rate = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    w, h = Image.open(paths[0]).size
    print(f"{len(paths)} 张 {w}×{h} JPEG → {a.size}×{a.size}，{a.rounds} 轮交替取中位数；"
          f"CPU {os.cpu_count()} 核，torch {torch.get_num_threads()} 线程，loader {workers} 个 worker，批次 {a.batch_size}")
    print("| 路径 | 图片/s | 相对朴素循环 |\n| --- | ---: | ---: |")
    labels = {"plain": "朴素 PIL 打开+缩放", "decode": "images.decode（draft 解码）",
              "loader": "训练输入（DataLoader + Collator）"}
    for k in ("plain", "decode", "loader"):
        print(f"| {labels[k]} | {rate[k]:.0f} | {rate[k] / rate['plain']:.2f}× |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
