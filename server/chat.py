"""POST /v1/chat/completions, as OpenAI clients call it: messages with text and image_url parts
(data: URLs; http(s) only with --allow-remote-images), streamed as chat.completion.chunk events."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from server.bodies import json_body
from server.generate import json_limit
from server.protocol import ChatCompletion, ChatRequest, api_docs, image_refs, parse, schema_of, turns
from server.runner import Reply, generate, sse, usage
from server.settings import Settings


class ChatReply(Reply):
    def __init__(self, model: str, include_usage: bool):
        self.head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": model}
        self.include_usage = include_usage

    @staticmethod
    def reason(job) -> str:
        return "stop" if job.finish_reason == "stop" else "length"

    def whole(self, job, text):
        return ChatCompletion(**self.head, choices=[{"message": {"content": text}, "finish_reason": self.reason(job)}],
                              usage=usage(job)).model_dump()

    def chunk(self, delta: dict, finish=None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if delta is not None else []
        return sse({**self.head, "object": "chat.completion.chunk", "choices": choices, **extra})

    def opening(self):
        return [self.chunk({"role": "assistant", "content": ""})]

    def piece(self, text):
        return self.chunk({"content": text})

    def closing(self, job):
        return [self.chunk({}, self.reason(job))] + ([self.chunk(None, usage=usage(job))] if self.include_usage else [])


def router(settings: Settings) -> APIRouter:
    r = APIRouter()
    body = {"application/json": {"schema": schema_of(ChatRequest, settings.limits)}}

    @r.post("/v1/chat/completions", **api_docs(body, ChatCompletion))
    async def chat(request: Request):
        srv = request.app.state.server
        srv.require_ready()
        req = parse(ChatRequest, await json_body(request, json_limit(settings, settings.max_images)), srv.limits)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await generate(request, srv, turns(req.messages), image_refs(req.messages), req, "messages",
                              ChatReply(settings.name, include_usage))
    return r
