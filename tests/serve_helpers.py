"""A real serve.py process on loopback, shared by the server and browser tests (session scope).

The test model is tiny and random, with its stop-token embeddings zeroed (tied embeddings, so
their logits are 0 while the best token's is far above): answers, greedy or sampled, always run to
max_new_tokens, so lengths and timings are predictable.
"""
from __future__ import annotations

import functools
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from checkpoint import save_checkpoint
from model import VLM
from scenes import make_scene, render
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent

# Starts serve.main() with server.state.load_model held until a file appears, so a test can see
# /health answer "loading" for as long as it needs (the server itself is unchanged).
GATED = """
import pathlib, sys, time, serve, server.state
gate = pathlib.Path(sys.argv.pop(1))
real = server.state.load_model
def held_load(*args):
    while not gate.exists():
        time.sleep(0.02)
    return real(*args)
server.state.load_model = held_load
serve.main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene_image(i=1, size=96, fmt="JPEG") -> bytes:
    objs, rng = make_scene(0, "test", i)
    buf = io.BytesIO()
    render(objs, rng, size).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def launch(args, log: Path, gate: Path | None = None, env=None) -> subprocess.Popen:
    code = GATED if gate else "import sys, serve; serve.main(sys.argv[1:])"
    cmd = [sys.executable, "-c", code, *([str(gate)] if gate else []), "--host", "127.0.0.1", "--log-level", "warning", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_http(base: str, proc: subprocess.Popen, log: Path, ready: bool, timeout=90.0) -> httpx.Response:
    """Poll /health until the port answers (ready=False) or answers 200 (ready=True)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            r = httpx.get(base + "/health", timeout=5)
            if not ready or r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"server at {base} not {'ready' if ready else 'listening'} after {timeout} s:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tiny_checkpoint(tok, path: Path) -> Path:
    """The test model (see the module docstring), saved at path."""
    torch.manual_seed(0)
    model = VLM(tiny_config(tok, lm_max_len=4096))
    with torch.no_grad():
        model.lm.embed.weight.mul_(10)              # peaked, input-dependent samples: readable varied text
        model.lm.embed.weight[tok.eos_id] = 0       # logit 0, far below the best: never chosen
        model.lm.embed.weight[tok.user_id] = 0      # the other stop token, likewise
        for special in (tok.assistant_id, tok.bos_id, tok.pad_id, tok.image_id):
            model.lm.embed.weight[special] = 0      # tokens that decode to no text: every step streams some
    save_checkpoint(path, model, tok, {"lang": "zh"})
    return path


@pytest.fixture(scope="session")
def servers(tok, tmp_path_factory):
    """main: the server most tests use (checkpoint from LLM_CHECKPOINT, loading held until the
    health check before load was recorded); tight: batch 1, queue 1, 0.5 s per request, remote
    images allowed, at most 2 images a request; web: the static page on its own port (allowed by main's CORS)."""
    d = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(tok, d / "tiny.pt")

    web_port = free_port()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", web_port), functools.partial(
        QuietHandler, directory=str(ROOT / "web")))
    threading.Thread(target=web.serve_forever, daemon=True).start()

    gate = d / "gate"
    main_port, tight_port = free_port(), free_port()
    main = launch(["--port", str(main_port), "--max-batch", "4", "--max-queue", "4", "--request-timeout", "30",
                   "--max-new-tokens", "8000", "--cors-origins", f"http://127.0.0.1:{web_port}"],
                  d / "main.log", gate=gate, env={"LLM_CHECKPOINT": str(ckpt)})
    tight = launch(["--checkpoint", str(ckpt), "--port", str(tight_port), "--max-batch", "1", "--max-queue", "1",
                    "--request-timeout", "0.5", "--max-new-tokens", "4000", "--allow-remote-images",
                    "--max-images", "2"], d / "tight.log")
    procs = [main, tight]
    try:
        base = f"http://127.0.0.1:{main_port}"
        before = wait_http(base, main, d / "main.log", ready=False)
        post_before = httpx.post(base + "/v1/generate", json={"prompt": "hi"}, timeout=10)
        gate.touch()
        after = wait_http(base, main, d / "main.log", ready=True)
        tight_base = f"http://127.0.0.1:{tight_port}"
        wait_http(tight_base, tight, d / "tight.log", ready=True)
        yield SimpleNamespace(base=base, tight=tight_base, web=f"http://127.0.0.1:{web_port}", ckpt=ckpt, dir=d,
                              before=before, post_before=post_before, after=after)
    finally:
        for p in procs:
            stop(p)
        web.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
