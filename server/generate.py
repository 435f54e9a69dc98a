"""POST /v1/generate-multipart (a form with image files: the `image` field repeated for several,
in order) and POST /v1/generate (JSON, at most one image as base64 or a data: URL): one prompt,
the answer as text."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from server.bodies import form_body, json_body
from server.protocol import GenerateForm, GenerateRequest, Generation, api_docs, parse, schema_of
from server.runner import Reply, generate, sse, usage
from server.settings import Settings


class GenerationReply(Reply):
    def __init__(self, model: str):
        self.id, self.model = "gen-" + uuid.uuid4().hex[:24], model

    def whole(self, job, text):
        return Generation(id=self.id, model=self.model, text=text, finish_reason=job.finish_reason,
                          usage=usage(job), timings=job.timings()).model_dump()

    def piece(self, text):
        return sse({"id": self.id, "text": text})

    def closing(self, job):
        return [sse(self.whole(job, ""))]


def json_limit(settings: Settings, images: int) -> int:
    """The body limit: base64 of `images` images plus room for the text."""
    return (settings.max_upload * 4 // 3 + 4) * images + 2 ** 20


def router(settings: Settings) -> APIRouter:
    r = APIRouter()
    form_schema = {"multipart/form-data": {"schema": schema_of(GenerateForm, settings.limits, form=True)}}
    json_schema = {"application/json": {"schema": schema_of(GenerateRequest, settings.limits)}}

    @r.post("/v1/generate-multipart", **api_docs(form_schema, Generation))
    async def generate_multipart(request: Request):
        srv = request.app.state.server
        srv.require_ready()
        form = await form_body(request, settings.max_upload + 2 ** 20, settings.max_images)
        fields = {k: v if isinstance(v, str) else None for k, v in form.items()}     # a file is no text
        if "image" in form:
            fields["image"] = form.getlist("image")
        req = parse(GenerateForm, fields, srv.limits, form=True)
        images = [(await upload.read(), "image") for upload in req.image]
        return await generate(request, srv, [{"role": "user", "content": req.prompt}], images, req, "prompt",
                              GenerationReply(settings.name))

    @r.post("/v1/generate", **api_docs(json_schema, Generation))
    async def generate_json(request: Request):
        srv = request.app.state.server
        srv.require_ready()
        req = parse(GenerateRequest, await json_body(request, json_limit(settings, 1)), srv.limits)
        images = [(req.image, "image")] if req.image else []
        return await generate(request, srv, [{"role": "user", "content": req.prompt}], images, req, "prompt",
                              GenerationReply(settings.name))
    return r
