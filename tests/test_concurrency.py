"""Serving under attack, against real serve.py processes on 127.0.0.1 (issue 12): while 16 hostile
clients upload memory bombs, time bombs and slow bodies, 8 normal clients keep their latency and
the server stays inside its memory budget; text-only requests never wait for image decoding; a
full decode queue answers 503; a client that leaves while its images wait or decode stops that work.

The memory bomb is the issue's: a ~120 KB solid-colour PNG of 6000x6000 pixels, under the pixel
cap and under the decode memory estimate's limit, so it is really decoded (~0.5 s and ~400 MB each)."""
import collections
import contextlib
import json
import multiprocessing
import socket
import statistics
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import httpx
import pytest

pytest.register_assert_rewrite("tests.serve_helpers")
from tests.serve_helpers import free_port, launch, scene_image, stop, tiny_checkpoint, wait_http
from tests.test_hostile import CHAT, MP, NOISY, chat, data_url, form, image_part, png_chunk

# docs/api.md and docs/faq.md state this budget: the test model's server at rest (~0.55 GB) + two
# decodes at once (server/state.py DECODE_WORKERS), each within uploads.DECODE_BYTES (512 MB), +
# 0.2 GB for bodies and the allocator. Measured peak under this attack: ~1.4 GB.
RSS_BUDGET_MB = 1792
RATIO = 3.0          # the issue's bound: normal clients' p95 latency under attack <= 3x alone
# Alone, the normal clients' p95 was 0.07-0.38 s on this loaded 2-core machine. Below FLOOR it is
# mostly scheduler noise (a quiet machine), so the bound is RATIO x max(alone p95, FLOOR): 0.3 s at
# least. The check can fail: with the decode threads at normal priority (state.DECODE_NICE = 0)
# this test measured 3.3x and 4.8x (p95 0.40 and 0.51 s).
FLOOR = 0.1
CLIENTS, ROUNDS = 8, 12
RESEND = 0.2         # s: a hostile client whose upload was refused sends it again this much later
NORMAL = {"prompt": "描述这张图片", "max_new_tokens": 24}


def solid_png(side: int) -> bytes:
    """A real side x side grey RGB PNG, highly compressible: ~120 KB for 6000 x 6000."""
    row = b"\0" + b"\x80" * (3 * side)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def attacked(tok, tmp_path_factory):
    """wide: room for 8 normal + 16 hostile requests in the engine and in decode admission
    (batch 8 + queue 16); narrow: batch 1 + queue 1, so two image requests fill decode admission."""
    d = tmp_path_factory.mktemp("attack")
    ckpt = tiny_checkpoint(tok, d / "tiny.pt")
    servers = {}
    for name, batch, queue in (("wide", 8, 16), ("narrow", 1, 1)):
        port = free_port()
        proc = launch(["--checkpoint", str(ckpt), "--port", str(port), "--max-batch", str(batch), "--max-queue",
                       str(queue), "--request-timeout", "10"], d / f"{name}.log")
        servers[name] = SimpleNamespace(base=f"http://127.0.0.1:{port}", port=port, proc=proc, log=d / f"{name}.log")
    try:
        for s in servers.values():
            wait_http(s.base, s.proc, s.log, ready=True)
        bomb = data_url(solid_png(6000))
        yield SimpleNamespace(**servers, bombs=lambda n: chat([{"type": "text", "text": "x"}] + [image_part(bomb)] * n))
    finally:
        for s in servers.values():
            stop(s.proc)


def health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=30).json()


def until(base: str, check, seconds=30.0) -> dict:
    """/health once check(it) holds; fails after `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        h = health(base)
        if check(h):
            return h
        time.sleep(0.02)
    pytest.fail(f"/health never reached the expected state in {seconds} s: {h}")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def normal_clients(base: str) -> list[float]:
    """CLIENTS clients, each asking ROUNDS times in a row: every latency (s). Every answer is 200."""
    latencies, failures = [], []

    def client():
        with httpx.Client(timeout=60) as c:
            for _ in range(ROUNDS):
                start = time.perf_counter()
                r = c.post(base + "/v1/generate", json=NORMAL)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    failures.append(r.text)
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    return latencies


def raw_post(port: int, path: str, body: bytes, sent: int | None = None) -> socket.socket:
    """A JSON request on a raw socket (that the caller may close mid-request); `sent`: how many
    bytes of the body to send now."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(body)) + body[:sent])
    return s


@contextlib.contextmanager
def both_workers_busy(srv, bombs):
    """Two requests of 4 memory bombs each, decoding in both workers; both answered 200 at the end."""
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(httpx.post(srv.base + CHAT, timeout=90, **bombs(4))))
               for _ in range(2)]
    for t in threads:
        t.start()
    until(srv.base, lambda h: h["decode"]["running"] == 2)
    yield
    for t in threads:
        t.join(90)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]


class Attack:
    """16 hostile clients until stopped: 8 send 2 memory bombs each (decoded: both workers stay
    busy), 4 the issue's 400-scan JPEG (refused from the file), 4 trickle a body a byte at a time.
    Each keeps one upload running: a refused one is sent again RESEND s later. (A flood of cheap
    requests is a matter of rate, which the server leaves to a reverse proxy, docs/faq.md.) They
    run in a process of their own, as attackers do: their Python work never holds the GIL that
    the measured normal clients need."""

    def __init__(self, srv, bombs):
        ctx = multiprocessing.get_context("fork")
        self.srv, self.bombs, self.done, self.results = srv, bombs, ctx.Event(), ctx.Queue()
        self.process = ctx.Process(target=self.run, daemon=True)
        self.answers = collections.Counter()          # (kind, status, error code)

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.answers = self.results.get(timeout=120)
        self.process.join(30)

    def run(self):
        threads = [threading.Thread(target=f) for f in [self.bomb] * 8 + [self.scans] * 4 + [self.slow] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.results.put(self.answers)

    def ask(self, kind: str, path: str, pause: float, **request):
        """Send the same request again and again, `pause` s apart, on one connection (a new
        httpx client per request costs the client ~10 ms of CPU, taken from the server's cores)."""
        with httpx.Client(timeout=90) as client:
            while not self.done.is_set():
                r = client.post(self.srv.base + path, **request)
                self.answers[kind, r.status_code, r.json().get("error", {}).get("code")] += 1
                self.done.wait(pause)

    def bomb(self):
        self.ask("bomb", CHAT, 0, **self.bombs(2))

    def scans(self):
        self.ask("scans", MP, RESEND, **form(NOISY + b"\xff\xda\0\x08" * 400, "a.jpg"))

    def slow(self):
        while not self.done.is_set():
            with raw_post(self.srv.port, "/v1/generate", b'{"prompt": "' + b"x" * 10 ** 5 + b'"}', sent=1) as s:
                while not self.done.wait(0.5):
                    try:
                        s.sendall(b"x")
                    except OSError:                   # 408 body_timeout: the server closed it
                        self.answers["slow", 408, "closed"] += 1
                        break


def memory_mb(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def test_normal_clients_keep_their_latency_and_memory_stays_bounded_under_attack(attacked):
    srv = attacked.wide
    assert httpx.post(srv.base + "/v1/generate", json=NORMAL, timeout=30).status_code == 200    # warm
    alone = normal_clients(srv.base)
    rest = memory_mb(srv.proc.pid)
    with Attack(srv, attacked.bombs) as attack:
        # measured once every bomb request has arrived (and is waiting for or in decoding)
        before = until(srv.base, lambda h: h["decode"]["running"] == 2 and h["decode"]["requests"] >= 8)["decode"]
        during = normal_clients(srv.base)
        after = health(srv.base)["decode"]
    peak = memory_mb(srv.proc.pid)["VmHWM"]
    # Alone again once the attack is over: the other work on this machine comes and goes within
    # seconds, so "alone" is the worse of the two windows that bracket the attack.
    alone = max(alone, normal_clients(srv.base), key=p95)
    load = open("/proc/loadavg").read().split()[0]
    print(f"\nalone p95 {p95(alone):.3f} s, under attack p95 {p95(during):.3f} s, ratio "
          f"{p95(during) / p95(alone):.2f}; RSS at rest {rest['VmRSS']} MB, peak {peak} MB; load {load}; "
          f"images decoded meanwhile {after['images'] - before['images']}; {dict(attack.answers)}")
    assert peak > rest["VmRSS"] + 300, (rest, peak)                         # bombs were decoded
    assert after["running"] == 2 and after["requests"] > 2, after      # the decode pool was full throughout
    assert p95(during) <= RATIO * max(p95(alone), FLOOR), (sorted(alone), sorted(during))
    assert peak < RSS_BUDGET_MB, peak
    kinds = {(kind, status) for kind, status, _ in attack.answers}
    assert ("bomb", 200) in kinds and {s for k, s in kinds if k == "bomb"} <= {200, 503}, attack.answers
    assert {code for kind, _, code in attack.answers if kind == "scans"} == {"image_scans"}, attack.answers
    assert health(srv.base)["status"] == "ok"
    assert "Traceback" not in srv.log.read_text(errors="replace")


def test_a_request_that_leaves_while_queued_for_decoding_is_dropped(attacked):
    """Two requests fill both decode workers; a third waits; its client hangs up: it leaves the
    queue at once, and none of its images is ever decoded."""
    srv = attacked.wide
    start = until(srv.base, lambda h: h["decode"]["requests"] == 0)["decode"]
    with both_workers_busy(srv, attacked.bombs):
        with raw_post(srv.port, CHAT, json.dumps(attacked.bombs(4)["json"]).encode()):
            until(srv.base, lambda h: h["decode"]["requests"] == 3)
        left = until(srv.base, lambda h: h["decode"]["requests"] == 2)["decode"]
        assert left["running"] == 2 and left["abandoned"] == start["abandoned"] + 1, left   # the others still decode
    end = until(srv.base, lambda h: h["decode"]["requests"] == 0)["decode"]
    assert end["images"] - start["images"] == 8, (start, end)                   # 2 x 4: none of the third's
    assert "Traceback" not in srv.log.read_text(errors="replace")


def test_text_only_requests_never_wait_for_image_decoding(attacked):
    """narrow server: two 4-bomb requests occupy both decode workers (and fill decode admission:
    batch 1 + queue 1). Meanwhile an image request is refused at once with 503 queue_full, and
    a text-only request is answered as fast as alone, while both decodes are still running."""
    srv = attacked.narrow
    alone = []
    for _ in range(5):
        start = time.perf_counter()
        assert httpx.post(srv.base + "/v1/generate", json=NORMAL, timeout=30).status_code == 200
        alone.append(time.perf_counter() - start)
    with both_workers_busy(srv, attacked.bombs):
        refused = httpx.post(srv.base + "/v1/generate", json={**NORMAL, "image": data_url(scene_image(fmt="PNG"))},
                             timeout=30)
        start = time.perf_counter()
        text = httpx.post(srv.base + "/v1/generate", json=NORMAL, timeout=30)
        took = time.perf_counter() - start
        still = health(srv.base)["decode"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full", refused.text
    assert int(refused.headers["retry-after"]) > 0 and "繁忙" in refused.json()["error"]["message"]
    assert text.status_code == 200 and took <= RATIO * max(max(alone), FLOOR), (took, alone)
    assert still["running"] == 2, still                   # the text answer did not wait for them


def test_a_client_leaving_during_decoding_stops_it_before_the_next_image(attacked):
    """A request with 4 bombs whose client hangs up while the first decodes: its decode stops
    after the image under way (at most 2 of its 4 are decoded), its job never reaches the engine,
    and the log has no traceback."""
    srv = attacked.narrow
    before = until(srv.base, lambda h: h["decode"]["requests"] == 0)
    with raw_post(srv.port, CHAT, json.dumps(attacked.bombs(4)["json"]).encode()):
        until(srv.base, lambda h: h["decode"]["running"] == 1)
    after = until(srv.base, lambda h: h["decode"]["requests"] == 0 and h["decode"]["running"] == 0)
    assert after["decode"]["abandoned"] == before["decode"]["abandoned"] + 1, after
    assert after["decode"]["images"] - before["decode"]["images"] <= 2, (before, after)
    assert after["engine"]["submitted"] == before["engine"]["submitted"], after
    assert httpx.post(srv.base + "/v1/generate", json=NORMAL, timeout=30).status_code == 200
    written = srv.log.read_text(errors="replace")
    assert "Traceback" not in written and "exception" not in written.lower(), written[-3000:]
