"""The demo's training step with word tokens vs one token per Chinese character, side by side.

    python bench/bench_words.py                      # tiny preset (the demo until 2026-12-03), batch 48, Muon
    python bench/bench_words.py --threads 1 --rounds 5

Both sides start from the same weights (but for the vocabulary's rows) and take the same scenes,
packed into rows (collate.pack) as train_vision.py does, with the demo's optimizer (Muon + AdamW):
`chars` tokenizes every Chinese character alone (the demo before word tokens), `words` lets the
demo's colour, shape and position names and fixed phrases be one token each (scenes.words). Both
tokenizers must decode every batch back to the same conversations (checked). The rounds alternate,
so machine load hits both alike. Printed: token positions and supervised tokens per step, seconds
per step (median of the rounds), ratio.
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


def conversations(tok, batches) -> list[list[str]]:
    """Each batch's samples as text (special tokens written out), sorted: packing orders them by length."""
    out = []
    for b in batches:
        ids = b["input_ids"].flatten().tolist()
        starts = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
        out.append(sorted(tok.show([t for t in ids[s:e] if t != tok.pad_id]) for s, e in zip(starts, starts[1:])))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="演示的训练步：按词切分 vs 每个汉字一个 token，同一批数据上每步用时")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="模型大小 (默认: tiny，2026-12-03 之前的演示)")
    p.add_argument("--optimizer", default="muon", choices=["adamw", "muon"], help="优化器 (默认: muon，同演示)")
    a = step_args(p, argv)
    texts = scenes.all_texts("zh")
    toks = {"chars": Tokenizer.train(texts, vocab_size=1024),
            "words": Tokenizer.train(texts, vocab_size=1024, words=scenes.words("zh"))}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {name: trainer_for(True, tok, a, Path(tmp), a.optimizer) for name, tok in toks.items()}
        batches = {}
        for name, t in sides.items():
            t.model.train()
            batches[name] = [t.to_device(b) for b in t.loader(t.train_data, 0)]
        if conversations(toks["chars"], batches["chars"]) != conversations(toks["words"], batches["words"]):
            sys.exit("the two tokenizers' batches do not decode to the same conversations")
        times = alternate(sides, batches, a.rounds)
    dtype = sides["words"].dtype
    print(f"{a.preset}，每步 {a.batch} 个样本，{a.optimizer}，{torch.get_num_threads()} 个线程，"
          f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.')}；两边的批次解码后相同")
    print("| 切分 | 词表 | 每步 token 位置 | 其中有标签 | 秒/步（中位数） |\n| --- | ---: | ---: | ---: | ---: |")
    for name, bs in batches.items():
        print(f"| {name} | {toks[name].vocab_size} | {statistics.mean(b['input_ids'].numel() for b in bs):.0f} | "
              f"{statistics.mean(int((b['labels'] >= 0).sum()) for b in bs):.0f} | {statistics.median(times[name]):.3f} |")
    ratio = statistics.median(times["chars"]) / statistics.median(times["words"])
    print(f"words 比 chars 快 {ratio:.2f} 倍")


if __name__ == "__main__":
    main()
