"""GGUF exports against our own model: the same greedy answers? how fast on the same CPU?

    python bench/bench_gguf.py --checkpoint checkpoints/vision_trained_model.pt --scenes 50 --threads 1

For each --quants (default f16, q8_0, q4_k_m) the checkpoint is exported (gguf_export.py) into a
temporary folder and llama.cpp (llama-cpp-python, a dev requirement) answers the caption prompt of
--scenes test scenes (scenes.py's test split, as evaluate.py scores them) greedily, one request at a
time. Our answers come from serve.py's engine (engine.Engine), one request at a time too. Prints,
per quant: the share of scenes whose answer is the same token for token as ours, caption exact match
(evaluate.py's rule), the file sizes, and batch-1 decode tokens/s of llama.cpp beside ours, both on
--threads threads. --json prints the results as one JSON line as well.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import scenes  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from engine import Engine, Job  # noqa: E402
from gguf_export import QUANTS, export  # noqa: E402
from images import to_tensor  # noqa: E402
from llama_runner import LlamaCpp  # noqa: E402


def scene_set(n: int, size: int, lang: str):
    """[(image, the caption's (cell, colour, shape) set)] for the first n test scenes (seed 0)."""
    out = []
    for i in range(n):
        objs, rng = scenes.make_scene(0, "test", i)
        out.append((scenes.render(objs, rng, size), {(o.cell, o.colour, o.shape) for o in objs}))
    return out


def ours(model, tok, prompt, images, max_new_tokens):
    """Our answers through serve.py's engine, one request at a time: (token lists, decode tokens/s)."""
    done = threading.Condition()
    finished = []

    def publish(events):
        with done:
            finished.extend(job for job, kind, _ in events if kind == "done")
            done.notify_all()

    engine = Engine(model, {tok.eos_id}, max_batch=1, publish=publish).start()
    answers, tokens, seconds = [], 0, 0.0
    try:
        for image in images:
            ids, _ = tok.encode_chat([{"role": "user", "content": prompt}], model.cfg.image_tokens, 1, True)
            job = Job(ids, to_tensor(image, model.cfg)[None], max_new_tokens=max_new_tokens)
            engine.submit(job)
            with done:
                done.wait_for(lambda: job in finished, timeout=600)
            answers.append(job.tokens)
            if len(job.tokens) > 1:
                tokens, seconds = tokens + len(job.tokens) - 1, seconds + job.t_end - job.t_first
    finally:
        engine.close()
    return answers, tokens / seconds if seconds else None


def llama_cpp(folder: Path, names: list, prompt, images, threads, max_new_tokens):
    """llama.cpp's answers for the export in `folder`: (token lists, decode tokens/s)."""
    model_file, mmproj_file = names
    llama = LlamaCpp(folder / model_file, folder / mmproj_file, threads=threads)
    answers, tokens, seconds = [], 0, 0.0
    try:
        for image in images:
            out, t = llama.greedy([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                  [image], max_new_tokens)
            answers.append(out)
            if len(out) > 1:
                tokens, seconds = tokens + len(out) - 1, seconds + t["decode_s"]
    finally:
        llama.close()
    return answers, tokens / seconds if seconds else None


def run(a) -> dict:
    torch.set_num_threads(a.threads)
    model, tok, meta = load_checkpoint(a.checkpoint)
    model.eval()
    lang = meta.get("lang", "zh")
    prompt = scenes.CAPTION_PROMPTS[lang][0]
    data = scene_set(a.scenes, model.cfg.vit_image_size, lang)
    images = [im for im, _ in data]
    exact = lambda answers: sum(scenes.parse_caption(tok.decode(t), lang) == truth
                                for t, (_, truth) in zip(answers, data)) / len(data)
    mine, mine_tps = ours(model, tok, prompt, images, a.max_new_tokens)
    result = {"checkpoint": a.checkpoint, "scenes": a.scenes, "threads": a.threads,
              "ours": {"caption_exact": exact(mine), "tokens_per_s": mine_tps}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in a.quants:
            folder = Path(tmp) / quant
            contents = export(model, tok, folder, quant)
            answers, tps = llama_cpp(folder, list(contents), prompt, images, a.threads, a.max_new_tokens)
            result[quant] = {"token_match": sum(x == y for x, y in zip(answers, mine)) / len(data),
                             "caption_exact": exact(answers), "tokens_per_s": tps,
                             "files": {name: {"mib": round((folder / name).stat().st_size / 2 ** 20, 2), "types": types}
                                       for name, types in contents.items()}}
    return result


def show(r: dict, quants):
    print(f"{r['checkpoint']}：{r['scenes']} 个测试场景，贪心解码，{r['threads']} 个线程，逐个请求")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"{'':10}{'与我们逐 token 相同':>14}{'描述精确匹配':>12}{'解码 tokens/s':>14}  文件")
    print(f"{'ours':10}{'-':>20}{r['ours']['caption_exact'] * 100:>17.1f}%{fmt(r['ours']['tokens_per_s']):>16}  (serve.py 引擎)")
    for q in quants:
        x = r[q]
        files = "; ".join(f"{n} {f['mib']} MiB {f['types']}" for n, f in x["files"].items())
        print(f"{q:10}{x['token_match'] * 100:>19.1f}%{x['caption_exact'] * 100:>17.1f}%{fmt(x['tokens_per_s']):>16}  {files}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/vision_trained_model.pt")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="threads for both (torch and llama.cpp)")
    p.add_argument("--quants", default=",".join(QUANTS), help="comma-separated, of " + ", ".join(QUANTS))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    a = p.parse_args(argv)
    a.quants = [q for q in a.quants.split(",") if q]
    if not set(a.quants) <= set(QUANTS):
        p.error(f"--quants: choose from {', '.join(QUANTS)}")
    t = time.time()
    r = run(a)
    show(r, a.quants)
    print(f"({time.time() - t:.0f} s)")
    if a.json:
        print(json.dumps(r, ensure_ascii=False))


if __name__ == "__main__":
    main()
