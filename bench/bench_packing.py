"""Training step with packed rows vs one sample a row, on the demo's own batches, side by side.

    python bench/bench_packing.py                    # tiny preset (the demo until 2026-12-03), batch 48
    python bench/bench_packing.py --threads 1 --rounds 5

Both sides start from the same weights and take the same batches (the demo's scenes, its grid
probe included): `padded` puts each sample in its own row, right-padded to the batch's longest;
`packed` (what train_vision.py and train_vision_real.py do with the built-in language model)
fills rows of that same length with several samples (collate.pack). The first batch's loss must
be equal on both sides (checked); the rounds alternate, so machine load hits both alike.
Printed: token positions per step (pad included), seconds per step (median of the rounds), ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import probes  # noqa: E402
import scenes  # noqa: E402
from collate import Collator  # noqa: E402
from model import PRESETS, VLM, VLMConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from trainer import TrainConfig, Trainer  # noqa: E402


def trainer_for(pack: bool, tok, a, output: Path, optimizer: str = "adamw", muon_steps: int = 5) -> Trainer:
    torch.manual_seed(0)
    cfg = VLMConfig(**PRESETS[a.preset], lm_vocab_size=-(-tok.vocab_size // 64) * 64, image_token_id=tok.image_id,
                    pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = VLM(cfg)
    data = scenes.SceneDataset(a.batch * a.steps, "train", 0, "zh", cfg.vit_image_size)
    tc = TrainConfig(batch_size=a.batch, epochs=1, output=str(output / f"{pack}-{id(tok)}.pt"), precision=a.precision,
                     workers=0, optimizer=optimizer, muon_steps=muon_steps)
    return Trainer(model, tok, data, Collator(tok, cfg, pack=pack), tc, aux=probes.CellProbe(model.vision, cfg.vit_dim),
                   log=lambda *x: None)


def run(t: Trainer, batches) -> float:
    """Seconds for forward, backward and the optimizer step over the batches."""
    start = time.perf_counter()
    for b in batches:
        t.forward_backward(t.loss, b, 1.0)
        t.opt.step()
        t.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def alternate(sides: dict, batches: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each side over its batches: one warm-up step each, then `rounds` rounds
    that take the sides in turn, so machine load hits them alike."""
    for name, t in sides.items():
        run(t, batches[name][:1])
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, t in sides.items():
            times[name].append(run(t, batches[name]) / len(batches[name]))
    return times


def step_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The flags every demo-step bench shares (batch, steps, rounds, precision, threads), parsed;
    the thread count is set here."""
    p.add_argument("--batch", type=int, default=48, help="每步样本数 (默认: 48，演示的批次)")
    p.add_argument("--steps", type=int, default=5, help="每轮计时的步数 (默认: 5)")
    p.add_argument("--rounds", type=int, default=3, help="交替测量的轮数，取中位数 (默认: 3)")
    p.add_argument("--precision", default="auto", help="auto / fp32 / bf16 (默认: auto，同演示)")
    p.add_argument("--threads", type=int, default=0, help="CPU 线程数，0 = torch 默认")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def main(argv=None):
    p = argparse.ArgumentParser(description="打包训练行 vs 每行一个样本：演示的同一批数据上每步用时")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="模型大小 (默认: tiny，2026-12-03 之前的演示)")
    a = step_args(p, argv)
    tok = Tokenizer.train(scenes.all_texts("zh"), vocab_size=1024, words=scenes.words("zh"))
    with tempfile.TemporaryDirectory() as tmp:
        sides = {name: trainer_for(name == "packed", tok, a, Path(tmp)) for name in ("padded", "packed")}
        batches, tokens, losses = {}, {}, {}
        for name, t in sides.items():
            t.model.train()
            batches[name] = [t.to_device(b) for b in t.loader(t.train_data, 0)]
            tokens[name] = statistics.mean(b["input_ids"].numel() for b in batches[name])
            with torch.no_grad():
                losses[name] = float(t.loss(batches[name][0])[0])
        if abs(losses["packed"] - losses["padded"]) > 1e-3 * abs(losses["padded"]):
            sys.exit(f"packed and padded losses differ on the first batch: {losses}")
        times = alternate(sides, batches, a.rounds)
    dtype = sides["packed"].dtype
    print(f"{a.preset}，每步 {a.batch} 个样本，{torch.get_num_threads()} 个线程，"
          f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.')}；首批损失两边相同（{losses['packed']:.5f}）")
    print("| 方式 | 每步 token 位置（含填充） | 秒/步（中位数） |\n| --- | ---: | ---: |")
    for name in sides:
        print(f"| {name} | {tokens[name]:.0f} | {statistics.median(times[name]):.3f} |")
    ratio = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed 比 padded 快 {ratio:.2f} 倍")


if __name__ == "__main__":
    main()
