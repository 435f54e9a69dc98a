"""Serving throughput of our export under vLLM beside serve.py on the same machine (bench/gpu.sh).

    python bench/bench_vllm.py                                  # untrained `small` preset, both servers
    python bench/bench_vllm.py --checkpoint checkpoints/vision_trained_model.pt
    python bench/bench_vllm.py --ours-only --preset micro       # serve.py alone (no vLLM here: the CPU check)

The checkpoint is exported with export_hf.py's code (bf16 safetensors, the LLaVA folder vLLM loads),
then each server is started on 127.0.0.1 in turn and gets the same OpenAI chat requests (a test
scene as a data URL + a question, greedy, max_tokens) from --clients concurrent clients. Prints
completion tokens/s and requests/s of each and the ratio vLLM / serve.py. serve.py runs on the GPU
when there is one (--device auto); vLLM needs a GPU and is not installed on the CPU machine.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.bench_serve import fresh_checkpoint, free_port, requests_for  # noqa: E402


def chat_body(model: str, req, max_tokens: int) -> dict:
    image, prompt = req
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": prompt}]}]}


def measure(base: str, model: str, reqs, clients: int, max_tokens: int) -> dict:
    """Every request once from `clients` concurrent clients: wall time, completion tokens, the texts."""
    texts, tokens, todo = [None] * len(reqs), [0] * len(reqs), iter(range(len(reqs)))

    async def client(c):
        for i in todo:                          # shared iterator: each index is taken once
            r = await c.post(base + "/v1/chat/completions", json=chat_body(model, reqs[i], max_tokens))
            r.raise_for_status()
            body = r.json()
            texts[i], tokens[i] = body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]

    async def run():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
            await asyncio.gather(*(client(c) for _ in range(clients)))
    t = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
            "req_per_s": len(reqs) / wall, "texts": texts}


def serve(cmd: list[str], port: int, log: Path, a, reqs) -> dict:
    """Start one server, wait for /health, warm it up, measure, stop it."""
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + a.start_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"服务没有启动（{' '.join(cmd[:3])} …）：\n" + log.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        measure(base, "m", reqs[:a.clients], a.clients, a.max_tokens)          # warm-up, not counted
        return measure(base, "m", reqs, a.clients, a.max_tokens)
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv=None):
    p = argparse.ArgumentParser(description="同一个导出分别用 vLLM 和 serve.py 提供服务，同样的并发 OpenAI 请求，比较吞吐。")
    p.add_argument("--checkpoint", help="模型文件（默认：临时生成一个 --preset 结构、未训练的模型）")
    p.add_argument("--preset", default="small", help="不给 --checkpoint 时生成的模型大小（默认 small）")
    p.add_argument("--clients", type=int, default=32, help="并发客户端数（默认 32）")
    p.add_argument("--requests", type=int, default=128, help="请求数（默认 128）")
    p.add_argument("--max-tokens", type=int, default=64, help="每个请求的 max_tokens（默认 64）")
    p.add_argument("--start-timeout", type=float, default=300, help="等服务启动的秒数（默认 300）")
    p.add_argument("--ours-only", action="store_true", help="只测 serve.py（没有 vLLM 的机器上检查本脚本）")
    p.add_argument("--json", help="把结果另存为 JSON 文件")
    a = p.parse_args(argv)
    if not a.ours_only:
        try:
            import vllm  # noqa: F401
        except ImportError:
            sys.exit("没有安装 vLLM（pip install vllm，需要 GPU）。只测 serve.py 请加 --ours-only。")

    from export_hf import main as export_hf
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(a.checkpoint) if a.checkpoint else fresh_checkpoint(tmp / "bench.pt", a.preset)
        export = tmp / "export"
        export_hf(["--checkpoint", str(ckpt), "--output", str(export), "--dtype", "bf16"])
        size = json.loads((export / "config.json").read_text())["vision_config"]["image_size"]
        reqs = requests_for(a.requests, size)
        runs = {}
        port = free_port()
        runs["serve.py"] = serve([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(ckpt), "--host", "127.0.0.1",
                                  "--port", str(port), "--max-batch", str(a.clients), "--log-level", "warning"],
                                 port, tmp / "serve.log", a, reqs)
        if not a.ours_only:
            port = free_port()
            runs["vLLM"] = serve([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
                                  "--served-model-name", "m", "--dtype", "bfloat16", "--port", str(port),
                                  "--host", "127.0.0.1", "--max-model-len", "2048", "--gpu-memory-utilization", "0.5"],
                                 port, tmp / "vllm.log", a, reqs)

    print(f"模型 {a.checkpoint or f'未训练的 {a.preset} 结构'}（导出为 bf16），{a.requests} 个请求，"
          f"{a.clients} 个并发客户端，max_tokens={a.max_tokens}，贪心")
    for name, r in runs.items():
        print(f"{name:<10} 用时 {r['wall_s']:7.2f} s  {r['req_per_s']:7.2f} 请求/s  {r['tokens_per_s']:9.1f} token/s  "
              f"生成 {r['tokens']} 个 token")
    result = {k: {m: v for m, v in r.items() if m != "texts"} for k, r in runs.items()}
    if "vLLM" in runs:
        same = sum(x == y for x, y in zip(runs["vLLM"]["texts"], runs["serve.py"]["texts"]))
        result["ratio"] = runs["vLLM"]["tokens_per_s"] / runs["serve.py"]["tokens_per_s"]
        print(f"vLLM / serve.py 吞吐比（token/s）：{result['ratio']:.2f}×；{same}/{a.requests} 个回答逐字相同")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), **result}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
