"""Load on loopback: 16 concurrent clients x 200 requests. Below the queue limit nothing fails;
past it the server answers 503 + Retry-After at once instead of letting clients time out; and
the server's memory does not grow from one round to the next. Every loop is bounded."""
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("tests.serve_helpers")
from tests.serve_helpers import free_port, launch, stop, wait_http

pytest_plugins = ["tests.serve_helpers"]               # the shared `servers` fixture (for its checkpoint)

CLIENTS, REQUESTS = 16, 200
ROUND_LIMIT_S = 150                                     # a round that takes longer fails, it never hangs


@pytest.fixture(scope="module")
def load_servers(servers, tmp_path_factory):
    """roomy: 8 in the batch + 16 waiting >= 16 clients; tight: 1 + 2, far below 16 clients."""
    d = tmp_path_factory.mktemp("load")
    ports = {"roomy": free_port(), "tight": free_port()}
    args = {"roomy": ["--max-batch", "8", "--max-queue", "16"], "tight": ["--max-batch", "1", "--max-queue", "2"]}
    procs = {name: launch(["--checkpoint", str(servers.ckpt), "--port", str(port), "--threads", "1",
                           "--request-timeout", "60", *args[name]], d / f"{name}.log") for name, port in ports.items()}
    try:
        for name, proc in procs.items():
            wait_http(f"http://127.0.0.1:{ports[name]}", proc, d / f"{name}.log", ready=True)
        yield {name: (f"http://127.0.0.1:{ports[name]}", procs[name]) for name in procs}
    finally:
        for proc in procs.values():
            stop(proc)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hammer(base: str, clients: int, requests: int, body: dict) -> tuple[Counter, list, float]:
    """clients threads x requests each, one keep-alive connection per client. Returns status
    counts (exceptions counted by name), the 503 answers, and the slowest answer in seconds."""
    codes, busy, slowest, lock = Counter(), [], [0.0], threading.Lock()
    deadline = time.monotonic() + ROUND_LIMIT_S

    def client():
        with httpx.Client(base_url=base, timeout=30) as c:
            for _ in range(requests):
                if time.monotonic() > deadline:
                    with lock:
                        codes["round_deadline"] += 1
                    return
                t = time.monotonic()
                try:
                    r = c.post("/v1/generate", json=body)
                    key = r.status_code
                except httpx.HTTPError as e:
                    r, key = None, type(e).__name__
                with lock:
                    codes[key] += 1
                    slowest[0] = max(slowest[0], time.monotonic() - t)
                    if r is not None and r.status_code == 503:
                        busy.append(r)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ROUND_LIMIT_S + 60)
    assert not any(t.is_alive() for t in threads), "a client thread did not stop"
    return codes, busy, slowest[0]


def test_below_the_queue_limit_nothing_fails_and_memory_stays_flat(load_servers):
    base, proc = load_servers["roomy"]
    tiny = {"prompt": "图里有什么？", "max_new_tokens": 2}
    hammer(base, CLIENTS, 10, tiny)                                   # warm-up: allocator, connections
    rss = []
    for _ in range(2):
        start = time.monotonic()
        codes, _, slowest = hammer(base, CLIENTS, REQUESTS, tiny)
        assert codes == Counter({200: CLIENTS * REQUESTS}), codes
        rss.append(rss_kb(proc.pid))
        print(f"round: {CLIENTS * REQUESTS} requests in {time.monotonic() - start:.1f} s, "
              f"slowest {slowest:.2f} s, server RSS {rss[-1] / 1024:.0f} MB")
    assert rss[1] - rss[0] < max(8 * 1024, rss[0] // 20), rss      # < 8 MB (or 5%) more after 3200 more requests
    health = httpx.get(base + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["engine"]["active"] == 0 and health["engine"]["waiting"] == 0


def test_past_the_queue_limit_503_with_retry_after_not_timeouts(load_servers):
    base, proc = load_servers["tight"]
    longer = {"prompt": "图里有什么？", "max_new_tokens": 48}           # each answer holds the one slot a while
    codes, busy, slowest = hammer(base, CLIENTS, 20, longer)
    assert set(codes) <= {200, 503}, codes                              # no timeouts, resets or 5xx but 503
    assert codes[503] > 0 and codes[200] > 0, codes
    for r in busy:
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "queue_full"
    assert slowest < 15, slowest                                        # nobody waits anywhere near the 30 s timeout
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
