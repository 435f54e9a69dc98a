"""The demo's training step with two model sizes, side by side: `tiny` (4 vision + 4 language
layers, 5 Newton-Schulz iterations in Muon: the demo until 2026-12-03) against `demo` (2 + 2 layers,
3 iterations: what train_vision.py trains now).

    python bench/bench_presets.py                    # tiny/5 vs demo/3, batch 48, the demo's precision
    python bench/bench_presets.py --threads 1 --rounds 5

Both sides take the same scenes, packed into rows as train_vision.py does, with the grid probe and
the demo's optimizer (Muon + AdamW); the forward, backward and optimizer step are timed, the rounds
alternate, so machine load hits both alike. Printed: parameters, seconds per step (median of the
rounds), the demo's 875 steps at that rate, and the ratio. Two sides must differ in preset or
iterations.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import scenes  # noqa: E402
from bench_packing import alternate, step_args, trainer_for  # noqa: E402
from model import PRESETS  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEMO_STEPS = 875                     # train_vision.py's defaults: 7 epochs of 6000 scenes, 48 a step


def main(argv=None):
    p = argparse.ArgumentParser(description="演示的训练步：两种模型大小在同一批数据上每步用时（交替测量）")
    p.add_argument("--presets", nargs=2, default=["tiny", "demo"], choices=sorted(PRESETS), metavar="PRESET",
                   help="比较的两个预设 (默认: tiny demo)")
    p.add_argument("--muon-steps", nargs=2, type=int, default=[5, 3], metavar="N",
                   help="两边各自的 Muon Newton–Schulz 迭代次数 (默认: 5 3)")
    a = step_args(p, argv)
    if a.presets[0] == a.presets[1] and a.muon_steps[0] == a.muon_steps[1]:
        sys.exit("两边的预设和 Muon 迭代次数都相同，没有可比的")
    tok = Tokenizer.train(scenes.all_texts("zh"), vocab_size=1024, words=scenes.words("zh"))
    sides, batches = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ns in zip(a.presets, a.muon_steps):
            side, key = argparse.Namespace(**{**vars(a), "preset": name}), f"{name}/{ns}"
            t = sides[key] = trainer_for(True, tok, side, Path(tmp), "muon", muon_steps=ns)
            t.model.train()
            batches[key] = [t.to_device(b) for b in t.loader(t.train_data, 0)]
        times = alternate(sides, batches, a.rounds)
    dtype = next(iter(sides.values())).dtype
    print(f"每步 {a.batch} 个样本，muon，{torch.get_num_threads()} 个线程，"
          f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.')}；两边是同一批场景")
    print(f"| 预设/Muon 迭代 | 参数 | 秒/步（中位数） | {DEMO_STEPS} 步 |\n| --- | ---: | ---: | ---: |")
    for name, t in sides.items():
        sec = statistics.median(times[name])
        params = sum(p.numel() for p in t.model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {sec:.3f} | {sec * DEMO_STEPS / 60:.1f} 分钟 |")
    first, second = sides
    print(f"{second} 比 {first} 快 {statistics.median(times[first]) / statistics.median(times[second]):.2f} 倍")


if __name__ == "__main__":
    main()
