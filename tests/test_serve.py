"""serve.py as users reach it: a real uvicorn process on 127.0.0.1 (see serve_helpers.py)."""
import base64
import http.server
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
import torch
from openai import OpenAI
from PIL import Image

pytest.register_assert_rewrite("tests.serve_helpers")  # imported below and as a plugin
from tests.serve_helpers import ROOT, free_port, scene_image

pytest_plugins = ["tests.serve_helpers"]               # the shared `servers` fixture: one set per session

CJK = re.compile(r"[\u4e00-\u9fff]")
# The user guide's line, character for character.
GUIDE_CURL = '''curl -X POST http://localhost:8000/v1/generate-multipart \\
  -F "image=@test_image.jpg" \\
  -F "prompt=描述这张图片" \\
  -F "max_new_tokens=100"'''


def sse_events(text: str) -> list:
    """Parsed `data:` payloads of an SSE body, [DONE] kept as the string."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def data_url(data: bytes, mime="image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def health(base):
    return httpx.get(base + "/health", timeout=10).json()


def test_health_before_and_after_load(servers):
    before = servers.before
    assert before.status_code == 503 and before.headers["retry-after"]
    assert before.json()["status"] == "loading" and before.json()["error"]["code"] == "loading"
    assert servers.post_before.status_code == 503
    assert servers.post_before.json()["error"]["code"] == "loading"
    assert CJK.search(servers.post_before.json()["error"]["message"])
    after = servers.after
    assert after.status_code == 200 and after.json()["status"] == "ok"
    assert after.json()["model"] == "tiny"                   # named after the file LLM_CHECKPOINT points to


def test_guide_curl_line_verbatim(servers, tmp_path):
    """The guide's command, unchanged. It names localhost:8000, which this test must not take
    from whoever else runs a server there, so curl reaches the test server as its HTTP proxy
    (serve.py accepts the absolute-form target a proxied request carries)."""
    (tmp_path / "test_image.jpg").write_bytes(scene_image())
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "all_proxy")}
    env["http_proxy"] = servers.base
    r = subprocess.run(["bash", "-c", GUIDE_CURL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 100
    assert len(body["text"]) > 0
    assert body["timings"]["total_ms"] > 0 and body["timings"]["first_token_ms"] <= body["timings"]["total_ms"]


def test_multipart_sampling_fields_and_stream(servers):
    url = servers.base + "/v1/generate-multipart"
    files = {"image": ("scene.png", scene_image(fmt="PNG"), "image/png")}
    fields = {"prompt": "图里有什么？", "max_new_tokens": "24", "temperature": "0.9", "top_p": "0.95",
              "top_k": "50", "seed": "7"}
    a = httpx.post(url, files=files, data=fields, timeout=30).json()
    b = httpx.post(url, files=files, data=fields, timeout=30).json()
    c = httpx.post(url, files=files, data={**fields, "seed": "8"}, timeout=30).json()
    assert a["text"] == b["text"] and a["text"] != c["text"]         # the seed decides the sample
    assert a["usage"]["completion_tokens"] == 24
    r = httpx.post(url, files=files, data={**fields, "stream": "true"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    pieces = [e["text"] for e in events[:-2]]
    assert len(pieces) > 1 and "".join(pieces) == a["text"]         # streamed piece by piece, same answer
    assert final["finish_reason"] == "length" and final["usage"] == a["usage"]


def test_json_generate_with_base64_and_data_url(servers):
    url = servers.base + "/v1/generate"
    img = scene_image(2)
    plain = httpx.post(url, json={"prompt": "描述这张图片", "image": base64.b64encode(img).decode(),
                                  "max_new_tokens": 12}, timeout=30)
    dataurl = httpx.post(url, json={"prompt": "描述这张图片", "image": data_url(img), "max_new_tokens": 12}, timeout=30)
    assert plain.status_code == dataurl.status_code == 200
    assert plain.json()["text"] == dataurl.json()["text"]
    assert plain.json()["usage"]["prompt_tokens"] > 16                # the image's 16 tokens are in the prompt
    no_image = httpx.post(url, json={"prompt": "你好", "max_new_tokens": 5}, timeout=30).json()
    assert no_image["usage"]["prompt_tokens"] < 16
    r = httpx.post(url, json={"prompt": "描述这张图片", "image": data_url(img), "max_new_tokens": 12, "stream": True},
                   timeout=30)
    events = sse_events(r.text)
    assert "".join(e["text"] for e in events[:-2]) == plain.json()["text"]


def test_openai_client_with_data_url_image(servers):
    client = OpenAI(base_url=servers.base + "/v1", api_key="local", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "描述这张图片"},
        {"type": "image_url", "image_url": {"url": data_url(scene_image(3, fmt="PNG"), "image/png")}}]}]
    sampling = dict(max_tokens=16, temperature=1.0, seed=5)      # seeded: the same answer twice
    done = client.chat.completions.create(model="tiny", messages=messages, **sampling)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 16 and done.usage.prompt_tokens > 16
    stream = client.chat.completions.create(model="tiny", messages=messages, **sampling, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    # multi-turn: history is rendered with the training template, so it lengthens the prompt
    longer = client.chat.completions.create(model="tiny", max_tokens=4, messages=messages + [
        {"role": "assistant", "content": done.choices[0].message.content},
        {"role": "user", "content": "左上角是什么颜色？"}])
    assert longer.usage.prompt_tokens > done.usage.prompt_tokens + 5


def test_chat_with_system_text_and_two_images(servers):
    """Each image_url becomes the model's image tokens where it stood; system text joins the
    first user turn; more than 4 images are refused."""
    url = servers.base + "/v1/chat/completions"
    img = {"type": "image_url", "image_url": {"url": data_url(scene_image(7))}}
    ask = lambda messages: httpx.post(url, json={"messages": messages, "max_tokens": 2}, timeout=30)
    one = ask([{"role": "user", "content": [{"type": "text", "text": "哪张图里有圆形？"}, img]}]).json()
    two = ask([{"role": "user", "content": [img, {"type": "text", "text": "哪张图里有圆形？"}, img]}]).json()
    sys_ = ask([{"role": "system", "content": "请用中文回答。"},
                {"role": "user", "content": [{"type": "text", "text": "哪张图里有圆形？"}, img]}]).json()
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] + 16      # 16 tokens per image
    assert sys_["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"] + 3
    too_many = ask([{"role": "user", "content": [img] * 5}])
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_images"


def names(tok, k: int) -> int:
    """Prompt tokens of the names 图1：… the template puts in front of k images in one turn."""
    from tokenizer import PICTURE
    return sum(len(tok.encode(PICTURE.format(i + 1))) for i in range(k))


def test_multipart_with_repeated_image_fields(servers, tok):
    """`image` sent several times: every image's tokens in the prompt, the same prompt as a chat
    message with those parts; past the server's limit (tight: --max-images 2) a 400 that says so.
    (This random test model's answers do not depend on the images; test_multi_image.py and
    test_serve_engine.py check that each image reaches its own place.)"""
    a, b, c = (scene_image(i, fmt="PNG") for i in (8, 9, 10))
    files = lambda *imgs: [("image", (f"{i}.png", img, "image/png")) for i, img in enumerate(imgs)]
    fields = {"prompt": "哪张图里有圆形？", "max_new_tokens": "8", "temperature": "1", "seed": "5"}   # varied text
    ask = lambda base, *imgs: httpx.post(base + "/v1/generate-multipart", files=files(*imgs), data=fields, timeout=30)
    one, two, three = ask(servers.base, a), ask(servers.base, a, b), ask(servers.base, a, b, c)
    assert [r.status_code for r in (one, two, three)] == [200] * 3, three.text
    n = one.json()["usage"]["prompt_tokens"]                  # several images: each named 图1：… in front
    assert two.json()["usage"]["prompt_tokens"] == n + 16 + names(tok, 2)
    assert three.json()["usage"]["prompt_tokens"] == n + 32 + names(tok, 3)
    parts = [{"type": "text", "text": fields["prompt"]}] + [{"type": "image_url", "image_url": {"url": data_url(x, "image/png")}}
                                                            for x in (a, b)]
    chat = httpx.post(servers.base + "/v1/chat/completions", timeout=30,
                      json={"max_tokens": 8, "temperature": 1, "seed": 5, "messages": [{"role": "user", "content": parts}]}).json()
    assert chat["choices"][0]["message"]["content"] == two.json()["text"]
    assert chat["usage"]["prompt_tokens"] == two.json()["usage"]["prompt_tokens"]
    over = ask(servers.tight, a, b, c)
    assert over.status_code == 400 and over.json()["error"]["code"] == "too_many_images", over.text
    assert over.json()["error"]["param"] == "image" and "2" in over.json()["error"]["message"]
    assert CJK.search(over.json()["error"]["message"])
    dup = httpx.post(servers.base + "/v1/generate-multipart", files=files(a), timeout=30,
                     data={"prompt": ["a", "b"]})
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "duplicate_field"   # text fields: still once


def test_chat_history_with_images_in_earlier_turns(servers, tok):
    """An image in the first turn and two in the last: 200, every image's tokens in the prompt;
    past the limit (tight: 2 images) counted over the whole history."""
    img = lambda i: {"type": "image_url", "image_url": {"url": data_url(scene_image(i))}}
    history = lambda first, last: [
        {"role": "user", "content": [*first, {"type": "text", "text": "描述这张图片"}]},
        {"role": "assistant", "content": "一个红色的圆形。"},
        {"role": "user", "content": [{"type": "text", "text": "这两张呢？"}, *last]}]
    ask = lambda base, messages: httpx.post(base + "/v1/chat/completions", timeout=30,
                                            json={"messages": messages, "max_tokens": 4})
    full, text = ask(servers.base, history([img(11)], [img(12), img(13)])), ask(servers.base, history([], []))
    assert full.status_code == text.status_code == 200, full.text
    assert full.json()["usage"]["prompt_tokens"] == text.json()["usage"]["prompt_tokens"] + 3 * 16 + names(tok, 2)
    over = ask(servers.tight, history([img(11)], [img(12), img(13)]))
    assert over.status_code == 400 and over.json()["error"]["code"] == "too_many_images"
    assert ask(servers.tight, history([img(11)], [img(12)])).status_code == 200


# ----------------------------------------------------------------------------- errors

def png_claiming(width, height) -> bytes:
    """A small valid PNG whose header says width x height (CRC fixed): only decoding would notice."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def image_as(fmt, **kw) -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(buf, format=fmt, **kw)
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3)).save(buf, format="JPEG")
    return buf.getvalue()


def multipart(image: bytes, **fields):
    return dict(files={"image": ("x.bin", image, "application/octet-stream")},
                data={"prompt": "描述这张图片", "max_new_tokens": "4", **fields})


def chat(content, **extra):
    return dict(json={"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra})


ERRORS = [  # (id, method, path, request kwargs, status, code, param)
    ("upload-over-20MB", "POST", "/v1/generate-multipart", lambda: multipart(os.urandom(21 * 2 ** 20)), 413, "body_too_large", None),
    ("pixels-over-limit", "POST", "/v1/generate-multipart", lambda: multipart(png_claiming(20000, 20000)), 400, "image_pixels", "image"),
    ("truncated-jpeg", "POST", "/v1/generate-multipart", lambda: multipart(noisy_jpeg()[:6000]), 400, "image_broken", "image"),
    ("not-an-image", "POST", "/v1/generate-multipart", lambda: multipart(b"hello, I am text"), 400, "image_unreadable", "image"),
    ("icon", "POST", "/v1/generate-multipart", lambda: multipart(image_as("ICO")), 400, "image_unreadable", "image"),
    ("temperature-range", "POST", "/v1/generate-multipart", lambda: multipart(scene_image(), temperature="5"), 400, "range", "temperature"),
    ("max-tokens-type", "POST", "/v1/generate-multipart", lambda: multipart(scene_image(), max_new_tokens="many"), 400, "type", "max_new_tokens"),
    ("max-tokens-zero", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "max_new_tokens": 0}), 400, "range", "max_new_tokens"),
    ("top-p-range", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "top_p": 1.5}), 400, "range", "top_p"),
    ("seed-type", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "seed": "abc"}), 400, "type", "seed"),
    ("stream-type", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "stream": "maybe"}), 400, "type", "stream"),
    ("missing-prompt", "POST", "/v1/generate", lambda: dict(json={"max_new_tokens": 3}), 400, "missing", "prompt"),
    ("prompt-chars", "POST", "/v1/generate", lambda: dict(json={"prompt": "字" * 5000}), 400, "prompt_chars", "prompt"),
    ("context-overflow", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "max_new_tokens": 5000}), 400, "context", "max_new_tokens"),
    ("bad-base64", "POST", "/v1/generate", lambda: dict(json={"prompt": "x", "image": "data:image/png;base64,@@@@"}), 400, "image_base64", "image"),
    ("remote-url-refused", "POST", "/v1/chat/completions", lambda: chat([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]), 400, "remote_disabled", "messages[0].content[0].image_url"),
    ("broken-data-url", "POST", "/v1/chat/completions", lambda: chat([{"type": "image_url", "image_url": {"url": data_url(b"GIF89a-broken")}}]), 400, "image_unreadable", "messages[0].content[0].image_url"),
    ("marker-in-text", "POST", "/v1/chat/completions", lambda: chat("look <image> here"), 400, "marker_in_text", "messages[0].content[0].text"),
    ("last-not-user", "POST", "/v1/chat/completions", lambda: dict(json={"messages": [{"role": "assistant", "content": "hi"}]}), 400, "last_user", "messages"),
    ("unknown-role", "POST", "/v1/chat/completions", lambda: dict(json={"messages": [{"role": "tool", "content": "hi"}]}), 400, "role", "messages[0].role"),
    ("n-2", "POST", "/v1/chat/completions", lambda: chat("hi", n=2), 400, "n", "n"),
    ("no-messages", "POST", "/v1/chat/completions", lambda: dict(json={"model": "tiny"}), 400, "missing", "messages"),
    ("invalid-json", "POST", "/v1/chat/completions", lambda: dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "json", None),
    ("wrong-content-type", "POST", "/v1/generate", lambda: dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 415, "content_type", None),
    ("multipart-as-json", "POST", "/v1/generate-multipart", lambda: dict(json={"prompt": "x"}), 415, "content_type", None),
    ("unknown-path", "GET", "/v1/nothing", lambda: {}, 404, "not_found", None),
    ("wrong-method", "GET", "/v1/generate", lambda: {}, 405, "method", None),
]


@pytest.mark.parametrize("method,path,make,status,code,param", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_answers(servers, method, path, make, status, code, param):
    """Every mistake: a 4xx, the JSON error shape, a Chinese message by default."""
    r = httpx.request(method, servers.base + path, timeout=60, **make())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
    assert CJK.search(err["message"]), err["message"]


def test_errors_in_english_on_request(servers):
    r = httpx.post(servers.base + "/v1/generate", json={"prompt": "x", "temperature": -1},
                   headers={"Accept-Language": "en-US,en;q=0.9,zh-CN;q=0.5"}, timeout=10)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.isascii() and "temperature" in message and "between 0.0 and 2.0" in message
    zh_first = httpx.post(servers.base + "/v1/generate", json={"prompt": "x", "temperature": -1},
                          headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"}, timeout=10)
    assert CJK.search(zh_first.json()["error"]["message"])


def test_queue_full_then_time_limit(servers):
    """tight server: 1 running + 1 waiting; a third request meanwhile gets 503 + Retry-After.
    Each request may take 0.5 s: a long answer is cut with finish_reason time_limit."""
    results = [None] * 3

    def ask(i):
        results[i] = httpx.post(servers.tight + "/v1/generate", json={"prompt": "x", "max_new_tokens": 4000},
                                timeout=30)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    busy = [r for r in results if r.status_code == 503]
    assert codes[0] == 200 and len(busy) >= 1, [r.text for r in results]
    assert any(r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) > 0 for r in busy)
    first = next(r for r in results if r.status_code == 200).json()
    assert first["finish_reason"] == "time_limit" and 0 < first["usage"]["completion_tokens"] < 4000
    assert 400 <= first["timings"]["total_ms"] < 5000


def test_client_disconnect_frees_its_slot(servers):
    """A client that leaves mid-answer (streaming, or waiting for a whole answer) is cancelled
    at once instead of decoding its 4000 tokens for nobody: the engine makes at most one more
    token for it (the step under way when it learnt of the cancel), and the log stays quiet."""
    log = servers.dir / "main.log"
    start = log.stat().st_size
    engine = health(servers.base)["engine"]
    before, after_cancel = engine.get("cancelled", 0), engine.get("tokens_after_cancel", 0)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", servers.base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 4000,
                                                                    "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_text())                                 # first piece arrived; now hang up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(servers.base + "/v1/generate", json={"prompt": "x", "max_new_tokens": 4000}, timeout=0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engine = health(servers.base)["engine"]
        if engine.get("cancelled", 0) == before + 2 and engine["active"] == 0:
            break
        time.sleep(0.05)
    assert engine.get("cancelled", 0) == before + 2 and engine["active"] == 0, engine
    assert engine["tokens_after_cancel"] - after_cancel <= 2, engine            # one step each at most
    written = log.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in written and "exception" not in written.lower(), written[-3000:]


def test_remote_image_when_enabled(servers):
    """--allow-remote-images (tight server): an http image_url is fetched."""
    import http.server
    img = scene_image(4, fmt="PNG")

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(img)))
            self.end_headers()
            self.wfile.write(img)

        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=srv.handle_request, daemon=True).start()
    try:
        r = httpx.post(servers.tight + "/v1/chat/completions", timeout=30, json={"max_tokens": 3, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{srv.server_port}/a.png"}},
                                         {"type": "text", "text": "描述这张图片"}]}]})
    finally:
        srv.server_close()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 16


class Hostile(http.server.BaseHTTPRequestHandler):
    """A remote-image target that trickles, redirects where it must not, or says secrets."""

    def do_GET(self):
        if self.path == "/trickle":                  # a byte every 0.2 s: no single read times out
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(150):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        targets = {"/to-ftp": "ftp://127.0.0.1/a.png", "/to-loopback": f"http://127.0.0.1:{self.server.server_port}/banner"}
        self.send_response(302 if self.path in targets else 500)
        self.send_header("Location", targets.get(self.path, ""))
        self.end_headers()
        self.wfile.write(b"SECRET-BANNER of the service on this port")

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("path", ["/trickle", "/to-ftp", "/to-loopback", "/banner"])
def test_remote_image_fetch_is_bounded_and_says_nothing_of_the_target(servers, path):
    """A trickling target (a byte every 0.2 s, no read ever times out) is given up at the 10 s
    deadline; no redirect to ftp:// or to loopback is followed; nothing the target said is repeated."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}{path}"
    try:
        start = time.monotonic()
        r = httpx.post(servers.tight + "/v1/generate", timeout=60, json={"prompt": "x", "max_new_tokens": 2, "image": url})
        took = time.monotonic() - start
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.status_code == 400 and r.json()["error"]["code"] == "remote_failed", r.text
    assert "SECRET" not in r.text and "ftp" not in r.text and took < 30, (r.text, took)


def test_cors_allows_the_page_origin(servers):
    r = httpx.options(servers.base + "/v1/generate-multipart", timeout=10, headers={
        "Origin": servers.web, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == servers.web
    other = httpx.options(servers.base + "/v1/generate-multipart", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    assert other.status_code == 400 and other.json()["error"]["code"] == "cors", other.text


def test_big_image_passes_the_text_limit(servers):
    """Past 1 MB a JSON body must be base64: a 2 MB data URL image still gets its answer."""
    noise = Image.frombytes("RGB", (800, 800), os.urandom(800 * 800 * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(url) > 2 ** 21
    r = httpx.post(servers.base + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "描述"}]}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_media_types_are_case_insensitive(servers):
    """`Application/JSON; charset=UTF-8` is JSON (was 415); the match is exact, not a prefix."""
    r = httpx.post(servers.base + "/v1/generate", timeout=60, content=json.dumps({"prompt": "x", "max_new_tokens": 2}),
                   headers={"content-type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    form = (b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--XyZ\r\nContent-Disposition: '
            b'form-data; name="max_new_tokens"\r\n\r\n2\r\n--XyZ--\r\n')
    r = httpx.post(servers.base + "/v1/generate-multipart", timeout=60, content=form,
                   headers={"content-type": "Multipart/Form-Data; boundary=XyZ"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_bad_checkpoint_stops_startup_with_one_message(tmp_path):
    """Missing, corrupt and foreign files (started side by side to save time): exit code 2 and a
    single line that says what is wrong and how to get a model - no traceback, no server."""
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04" + os.urandom(500))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    procs = {}
    for kind in ("missing", "corrupt", "foreign"):
        env = {**os.environ, "LLM_CHECKPOINT": str(tmp_path / f"{kind}.pt")}
        procs[kind] = subprocess.Popen([sys.executable, "serve.py", "--port", str(free_port())], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    says = {"missing": "找不到", "corrupt": "已损坏", "foreign": "不是本工具保存的"}
    for kind, proc in procs.items():
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 2, (kind, out)
        lines = [l for l in out.splitlines() if l.strip()]
        assert len(lines) == 1, (kind, lines)
        assert lines[0].startswith("错误：") and str(tmp_path / f"{kind}.pt") in lines[0] and says[kind] in lines[0]
        assert "python train_vision.py" in lines[0] and "LLM_CHECKPOINT" in lines[0]


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch):
    import serve
    monkeypatch.setenv("SERVE_MAX_BATCH", "3")
    monkeypatch.setenv("SERVE_ALLOW_REMOTE_IMAGES", "1")
    monkeypatch.setenv("LLM_CHECKPOINT", "from_env.pt")
    s = serve.settings_from(serve.build_parser().parse_args(["--max-batch", "5"]))
    assert (s.max_batch, s.allow_remote_images, s.checkpoint, s.port) == (5, True, "from_env.pt", 8000)
    assert s.name == "from_env"
    monkeypatch.setenv("SERVE_PORT", "eighty")
    with pytest.raises(serve.UserError, match="SERVE_PORT"):
        serve.settings_from(serve.build_parser().parse_args([]))


def test_reload_mode_gets_the_same_connection_limits(servers, monkeypatch):
    """`serve.py --reload` (make serve-dev) starts uvicorn another way; it too runs our connection
    class (the request headers' size and time limits, server/connection.py), with the same options."""
    import uvicorn

    import serve
    from server.connection import BoundedHttp
    seen = {}

    class Plain:
        def __init__(self, config):
            seen["plain"] = config

        def run(self):
            pass
    monkeypatch.setattr(os, "environ", dict(os.environ))         # --reload hands its settings on in it
    monkeypatch.setattr(sys, "setswitchinterval", lambda seconds: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(reload=options))
    monkeypatch.setattr(uvicorn, "Server", Plain)
    args = ["--checkpoint", str(servers.ckpt), "--port", str(free_port())]
    serve.main(args + ["--reload"])
    serve.main(args)
    assert seen["reload"]["reload"] and seen["reload"]["http"] is BoundedHttp and seen["plain"].http is BoundedHttp
    assert seen["reload"]["timeout_graceful_shutdown"] == seen["plain"].timeout_graceful_shutdown == 3


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_upload_limit_must_be_a_finite_positive_number(monkeypatch, capsys, value):
    """SERVE_MAX_UPLOAD_MB=inf used to pass, then every request (even /health) was a 500."""
    import serve
    monkeypatch.setenv("SERVE_MAX_UPLOAD_MB", value)
    with pytest.raises(SystemExit) as e:
        serve.main(["--port", str(free_port())])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("错误：") and "max_upload_mb" in lines[0], lines


def test_request_models_check_what_the_schema_documents():
    """In-process, without HTTP: one declaration gives the bound in /openapi.json and the check."""
    from server import protocol
    from server.errors import ApiError
    limits = {"max_new_tokens": 8, "max_prompt_chars": 300, "vocab": 600}
    props = protocol.schema_of(protocol.GenerateRequest, limits)["properties"]
    assert (props["max_new_tokens"]["maximum"], props["temperature"]["maximum"], props["prompt"]["maxLength"]) == (8, 2.0, 300)
    with pytest.raises(ApiError) as e:
        protocol.parse(protocol.GenerateRequest, {"prompt": "x", "max_new_tokens": 9}, limits)
    assert (e.value.code, e.value.param, e.value.fmt["hi"]) == ("range", "max_new_tokens", 8)
    bad_part = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}
    with pytest.raises(ApiError) as e:
        protocol.parse(protocol.ChatRequest, {"messages": [bad_part]}, limits)
    assert (e.value.code, e.value.param) == ("missing", "messages[0].content[1].image_url.url")
    form = protocol.parse(protocol.GenerateForm, {"prompt": "x", "max_new_tokens": " 3 ", "stream": "on"}, limits, form=True)
    assert (form.max_new_tokens, form.stream, form.length()) == (3, True, (3, "max_new_tokens"))
