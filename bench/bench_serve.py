"""Serving throughput: the same requests one at a time, then from 8 concurrent clients, against
one serve.py process started here (127.0.0.1, a free port). Batching should make the second
phase several times faster: the engine decodes all running requests in one forward per step.

    python bench/bench_serve.py                      # preset tiny (the demo's architecture), untrained
    python bench/bench_serve.py --preset micro       # almost no arithmetic: the engine's own cost
    python bench/bench_serve.py --checkpoint checkpoints/vision_trained_model.pt
    python bench/bench_serve.py --hf-tiny            # CLIP + Hugging Face Llama, the preset's LLM sizes

Without --checkpoint a model of train_vision.py's --preset is built with random weights, so the
run needs no training; --hf-tiny instead saves a tiny CLIP tower and a Llama (tests/tiny_hf.py,
the LLM sized as the preset's) to folders, builds the model from them with the real loading code
(backbones.build_vlm) and serves that checkpoint, so the engine batches a transformers LLM.
An untrained model's greedy answers rarely hit the end token and so run to --max-new-tokens (a
trained model answers shorter). The two ways alternate for --rounds rounds
so a change in machine load hits both. Prints requests/s, tokens/s, p50/p99 latency per way and
the throughput ratio; exits 1 when the ratio is below --min-ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

import scenes  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from model import PRESETS, VLM, VLMConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def fresh_checkpoint(path: Path, preset: str = "tiny") -> Path:
    """A model of train_vision.py's --preset with untrained weights."""
    tok = Tokenizer.train(scenes.all_texts("zh"), vocab_size=1024, words=scenes.words("zh"))
    cfg = VLMConfig(**PRESETS[preset])
    cfg.lm_vocab_size = -(-tok.vocab_size // 64) * 64
    cfg.image_token_id, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.image_id, tok.pad_id, tok.bos_id, tok.eos_id
    torch.manual_seed(0)
    save_checkpoint(path, VLM(cfg), tok, {"lang": "zh", "data": "none (benchmark)"})
    return path


def hf_tiny_checkpoint(folder: Path, preset: str = "tiny") -> Path:
    """CLIP + Llama folders as a user's downloads would be (built from configs, never downloaded),
    loaded as backbones and saved as one of our checkpoints; the Llama has the preset's LLM sizes."""
    from backbones import build_vlm
    from tests.tiny_hf import save_clip, save_llama
    c = VLMConfig(**PRESETS[preset])
    llama = save_llama(folder / "llama", hidden_size=c.lm_dim, intermediate_size=c.lm_hidden,
                       num_hidden_layers=c.lm_layers, num_attention_heads=c.lm_heads, num_key_value_heads=c.lm_kv_heads)
    torch.manual_seed(0)
    model, tok = build_vlm(str(save_clip(folder / "clip")), str(llama))
    save_checkpoint(folder / "bench.pt", model, tok, {"lang": "zh", "data": "none (benchmark)"})
    return folder / "bench.pt"


def requests_for(n: int, size: int) -> list[tuple[bytes, str]]:
    """n different (PNG image, question) pairs from the synthetic test scenes."""
    out = []
    for i in range(n):
        objs, rng = scenes.make_scene(123, "test", i)
        buf = io.BytesIO()
        scenes.render(objs, rng, size).save(buf, format="PNG")
        qs = [q for _, q, _, _ in scenes.questions(objs, "zh")]
        prompt = scenes.CAPTION_PROMPTS["zh"][i % 5] if i % 2 == 0 else qs[i % len(qs)]
        out.append((buf.getvalue(), prompt))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ask(client: httpx.AsyncClient, base: str, req, max_new_tokens: int) -> tuple[float, int, str]:
    image, prompt = req
    t = time.perf_counter()
    r = await client.post(base + "/v1/generate-multipart", files={"image": ("scene.png", image, "image/png")},
                          data={"prompt": prompt, "max_new_tokens": str(max_new_tokens)})
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - t, body["usage"]["completion_tokens"], body["text"]


def run_phase(base: str, reqs, clients: int, max_new_tokens: int, ask=ask) -> dict:
    """Every request once, by `clients` clients that each send the next request when free;
    ask(client, base, request, max_new_tokens) -> (seconds, completion tokens, text)."""
    results = [None] * len(reqs)
    todo = iter(range(len(reqs)))

    async def client(c):
        for i in todo:                          # shared iterator: each index is taken once
            results[i] = await ask(c, base, reqs[i], max_new_tokens)

    async def phase():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
            await asyncio.gather(*(client(c) for _ in range(clients)))
    t = time.perf_counter()
    asyncio.run(phase())
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": len(reqs), "wall_s": wall, "tokens": sum(r[1] for r in results),
            "lat": [r[0] for r in results], "texts": [r[2] for r in results]}


def wait_until_healthy(server: subprocess.Popen, base: str, log: Path, timeout: float):
    """Until GET /health answers 200; exits with the server's log when it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("服务没有启动：\n" + log.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def merge(runs: list[dict]) -> dict:
    """Several runs of one phase as one: summed time and tokens, latency percentiles over all."""
    lat = sorted(l for r in runs for l in r["lat"])
    pct = lambda p: lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1000
    wall, n, tokens = sum(r["wall_s"] for r in runs), sum(r["requests"] for r in runs), sum(r["tokens"] for r in runs)
    return {"clients": runs[0]["clients"], "requests": n, "wall_s": wall, "req_per_s": n / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "p50_ms": pct(50), "p99_ms": pct(99), "texts": runs[-1]["texts"]}


def main(argv=None):
    p = argparse.ArgumentParser(description="服务吞吐基准：同一批请求先逐个发送，再由 8 个并发客户端发送，比较吞吐量。")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", help="模型文件（默认：临时生成一个 tiny 结构、未训练的模型）")
    m.add_argument("--hf-tiny", action="store_true",
                   help="改用临时生成的 CLIP 视觉塔 + Hugging Face Llama（未训练，语言模型大小同 --preset），"
                        "测 transformers 语言模型的批量生成")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="不给 --checkpoint 时生成的模型大小（默认 tiny，2026-12-03 之前演示模型的结构）")
    p.add_argument("--clients", type=int, default=8, help="并发客户端数（默认 8）")
    p.add_argument("--requests", type=int, default=32, help="每轮的请求数（默认 32）")
    p.add_argument("--max-new-tokens", type=int, default=128, help="每个请求的 max_new_tokens（默认 128）")
    p.add_argument("--rounds", type=int, default=2, help="两种方式交替各跑几轮（默认 2）")
    p.add_argument("--min-ratio", type=float, default=4.0, help="吞吐比低于它时退出码为 1（默认 4）")
    p.add_argument("--json", help="把结果另存为 JSON 文件")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = (Path(a.checkpoint) if a.checkpoint else hf_tiny_checkpoint(Path(tmp), a.preset) if a.hf_tiny
                else fresh_checkpoint(Path(tmp) / "bench.pt", a.preset))
        cfg_size = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]["vit_image_size"]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(ckpt), "--host", "127.0.0.1",
                                   "--port", str(port), "--max-batch", str(a.clients), "--log-level", "warning"],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(server, base, Path(tmp) / "server.log", 120)
            reqs = requests_for(a.requests, cfg_size)
            run_phase(base, reqs[:a.clients], a.clients, a.max_new_tokens)          # warm-up, not counted
            ones, manys, rows, steps = [], [], 0, 0
            for _ in range(a.rounds):          # alternate, so a change in machine load hits both phases
                ones.append(run_phase(base, reqs, 1, a.max_new_tokens))
                before = httpx.get(base + "/health").json()["engine"]
                manys.append(run_phase(base, reqs, a.clients, a.max_new_tokens))
                after = httpx.get(base + "/health").json()["engine"]
                rows += after["rows_stepped"] - before["rows_stepped"]
                steps += after["steps"] - before["steps"]
            one, many = merge(ones), merge(manys)
        finally:
            server.terminate()
            server.wait(30)

    rows_during, steps_during = rows, steps
    ratio = many["req_per_s"] / one["req_per_s"]
    same = sum(x == y for x, y in zip(one["texts"], many["texts"]))
    name = a.checkpoint or f"未训练的 {a.preset} 结构" + ("（CLIP + Hugging Face Llama）" if a.hf_tiny else "")
    print(f"模型 {name}，每轮 {a.requests} 个请求 × {a.rounds} 轮，"
          f"max_new_tokens={a.max_new_tokens}，{os.cpu_count()} 个 CPU 核")
    print(f"{'方式':<14}{'用时(s)':>9}{'请求/s':>9}{'token/s':>10}{'p50(ms)':>10}{'p99(ms)':>10}{'生成token':>10}")
    for name, r in (("逐个发送", one), (f"{a.clients} 个并发", many)):
        print(f"{name:<14}{r['wall_s']:>9.2f}{r['req_per_s']:>9.2f}{r['tokens_per_s']:>10.1f}{r['p50_ms']:>10.0f}"
              f"{r['p99_ms']:>10.0f}{r['tokens']:>10}")
    print(f"吞吐比（并发/逐个）：{ratio:.2f}×；并发时平均每步解码 {rows_during / max(1, steps_during):.1f} 个序列；"
          f"最后一轮 {same}/{a.requests} 个回答与逐个发送时逐字相同")
    if a.json:
        Path(a.json).write_text(json.dumps({"one_at_a_time": {k: v for k, v in one.items() if k != "texts"},
                                            "concurrent": {k: v for k, v in many.items() if k != "texts"},
                                            "settings": vars(a),
                                            "ratio": ratio}, ensure_ascii=False, indent=1))
    if ratio < a.min_ratio:
        print(f"吞吐比低于 {a.min_ratio}×", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
