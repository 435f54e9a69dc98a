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

from bench.bench_serve import fresh_checkpoint, free_port, merge, requests_for, run_phase, wait_until_healthy  # noqa: E402


def chat_body(model: str, req, max_tokens: int) -> dict:
    image, prompt = req
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": prompt}]}]}


async def ask_chat(client: httpx.AsyncClient, base: str, req, max_tokens: int) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = await client.post(base + "/v1/chat/completions", json=chat_body("m", req, max_tokens))
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - t, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


def serve(cmd: list[str], port: int, log: Path, a, reqs) -> dict:
    """Start one server, wait for /health, warm it up, measure, stop it."""
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(proc, base, log, a.start_timeout)
        run_phase(base, reqs[:a.clients], a.clients, a.max_tokens, ask_chat)          # warm-up, not counted
        return merge([run_phase(base, reqs, a.clients, a.max_tokens, ask_chat)])
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
    result = {k: {m: v for m, v in r.items() if m not in ("texts", "lat")} for k, r in runs.items()}
    if "vLLM" in runs:
        same = sum(x == y for x, y in zip(runs["vLLM"]["texts"], runs["serve.py"]["texts"]))
        result["ratio"] = runs["vLLM"]["tokens_per_s"] / runs["serve.py"]["tokens_per_s"]
        print(f"vLLM / serve.py 吞吐比（token/s）：{result['ratio']:.2f}×；{same}/{a.requests} 个回答逐字相同")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), **result}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
