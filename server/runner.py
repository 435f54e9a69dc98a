"""One generation, shared by every generating endpoint, streamed or not: images -> pixels,
turns -> prompt ids, a job for the engine, then either the whole answer or server-sent events.
A client that hangs up cancels its job. How an endpoint words its answer is its Reply."""
from __future__ import annotations

import asyncio
import json
import threading
from asyncio import FIRST_COMPLETED

import torch
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from engine import Job, QueueFull
from server.errors import ApiError, busy, language
from server.protocol import Generating
from server.state import Server
from server.uploads import decoded, first_look

DEFAULT_NEW_TOKENS = 128
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FAILED = ("error", "cancelled")


class Reply:
    """An endpoint's wording: the whole answer, or the events around the streamed pieces."""

    def whole(self, job: Job, text: str) -> dict:
        raise NotImplementedError

    def opening(self) -> list[str]:
        return []

    def piece(self, text: str) -> str:
        raise NotImplementedError

    def closing(self, job: Job) -> list[str]:
        raise NotImplementedError


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.ids) + len(job.tokens)}


async def generate(request: Request, srv: Server, turns: list[dict], images: list, req: Generating,
                   param: str, reply: Reply):
    """The answer to one request: a dict (JSON), a stream of events, or 499 if the client left."""
    try:
        pixels = await decode(request, srv, images) if images else None
    except ClientLeft:
        return Response(status_code=499)
    job = start(srv, prompt_ids(srv, turns, len(images), param), pixels, req)
    first = await next_event(job, request)
    if first is None:
        return Response(status_code=499)
    if first[0] == "done":
        check_outcome(srv, job)
    if not job.stream:
        return reply.whole(job, srv.tok.decode(job.tokens))
    return StreamingResponse(events(srv, job, first, reply, language(request)), media_type="text/event-stream",
                             headers=SSE_HEADERS)


class ClientLeft(Exception):
    """The client hung up while its images waited for or were in the decode pool."""


async def decode(request: Request, srv: Server, images: list):
    """The images' pixels from the bounded decode pool (server/state.py). Admission first: past
    max_batch + max_queue requests waiting for it, 503 at once. Then a first look at each file
    (uploads.first_look: a 4xx from the header without a worker); one still waiting (not started)
    at the request's time limit gives up, undecoded. A client that leaves drops its images from
    the queue, or stops its decode before the next image. Text-only requests never wait here."""
    s = srv.settings
    if srv.decoding >= s.max_batch + s.max_queue:
        raise busy("queue_full")
    left = threading.Event()
    srv.decoding += 1
    watcher = None
    try:
        images = await asyncio.to_thread(first_look, images, s, srv.model.cfg)
        work = srv.decoder.submit(decode_images, srv, images, left)
        future, watcher = asyncio.wrap_future(work), asyncio.ensure_future(wait_disconnect(request))
        done, _ = await asyncio.wait({future, watcher}, timeout=s.request_timeout, return_when=FIRST_COMPLETED)
        if not done:
            if work.cancel():             # still waiting for a worker
                raise busy("queue_timeout", limit=s.request_timeout)
            # decoding: bounded by its own limits (pixels, memory, scans, fetch deadline)
            done, _ = await asyncio.wait({future, watcher}, return_when=FIRST_COMPLETED)
        if future in done:
            return future.result()
        left.set()
        work.cancel()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())     # nobody reads its error
        srv.tally("abandoned")
        raise ClientLeft
    finally:
        if watcher:
            watcher.cancel()
        srv.decoding -= 1


def decode_images(srv: Server, images: list, left: threading.Event) -> torch.Tensor | None:
    """Worker thread: the stacked (n, 3, H, W) pixels, decoded one image at a time; None as soon
    as the client has left (checked before each image)."""
    srv.tally("started")
    try:
        out = []
        for pixels in decoded(images, srv.settings, srv.model.cfg):
            out.append(pixels)
            srv.tally("images")
            if left.is_set():
                return None
        return torch.stack(out)
    finally:
        srv.tally("finished")


def prompt_ids(srv: Server, turns: list[dict], n_images: int, param: str) -> list[int]:
    chars = sum(len(t["content"]) for t in turns)
    if chars > srv.settings.max_prompt_chars:
        raise ApiError(400, "prompt_chars", param, n=chars, limit=srv.settings.max_prompt_chars)
    try:
        ids, _ = srv.tok.encode_chat(turns, srv.model.cfg.image_tokens, n_images, add_generation_prompt=True)
    except ValueError:
        raise ApiError(400, "image_markers", param, images=n_images) from None
    ctx = srv.model.cfg.lm_max_len
    if len(ids) >= ctx:
        raise ApiError(400, "prompt_tokens", param, n=len(ids), ctx=ctx)
    return ids


def start(srv: Server, ids: list[int], pixels, req: Generating) -> Job:
    ctx, room = srv.model.cfg.lm_max_len, srv.model.cfg.lm_max_len - len(ids)
    n, param = req.length()
    if n is None:
        n = min(DEFAULT_NEW_TOKENS, srv.settings.max_new_tokens, room)
    elif n > room:
        raise ApiError(400, "context", param, n=len(ids), ctx=ctx, room=room)
    job = Job(ids, pixels, n, 0.0 if req.temperature is None else req.temperature, req.top_k or 0,
              1.0 if req.top_p is None else req.top_p, req.seed, timeout=srv.settings.request_timeout,
              stream=bool(req.stream))
    job.inbox = asyncio.Queue()
    try:
        srv.engine.submit(job)
    except QueueFull:
        raise busy("queue_full") from None
    return job


async def next_event(job: Job, request: Request):
    """The job's next event; None if the client went away meanwhile (the job is cancelled)."""
    getter = asyncio.ensure_future(job.inbox.get())
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if getter in done:
        return getter.result()
    getter.cancel()
    job.cancel()
    return None


async def wait_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_outcome(srv: Server, job: Job):
    if job.finish_reason == "queue_timeout":
        raise busy("queue_timeout", limit=srv.settings.request_timeout)
    if job.finish_reason in FAILED:
        raise ApiError(500, "internal")


async def events(srv: Server, job: Job, event, reply: Reply, lang: str):
    """The streamed answer from its first event on; the job ends with the stream, however it ends."""
    out = TextStream(srv.tok)
    try:
        for line in reply.opening():
            yield line
        while event[0] == "token":
            if piece := out.push(event[1]):
                yield reply.piece(piece)
            event = await job.inbox.get()
        if piece := out.close():
            yield reply.piece(piece)
        for line in [sse(ApiError(500, "internal").payload(lang))] if job.finish_reason in FAILED else reply.closing(job):
            yield line
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()                     # a no-op once finished; frees the slot if the client left


class TextStream:
    """Token ids -> text pieces, never cutting a multi-byte character in half."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._delta(text)

    def close(self) -> str:
        return self._delta(self.tok.decode(self.ids))

    def _delta(self, text: str) -> str:
        delta, self.sent = text[len(self.sent):], text
        return delta
