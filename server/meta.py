"""GET /health (503 while the model loads) and GET /v1/models (OpenAI's list, of one model)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import RETRY_AFTER, busy, language
from server.protocol import Health, api_docs
from server.settings import Settings


def router(settings: Settings) -> APIRouter:
    r = APIRouter()

    @r.get("/health", **api_docs(ok=Health, errors=(503,)))
    async def health(request: Request):
        srv = request.app.state.server
        if not srv.ready:
            return JSONResponse({"status": "loading", **busy("loading").payload(language(request))}, 503,
                                headers={"Retry-After": str(RETRY_AFTER)})
        return {"status": "ok", "model": settings.name, "device": str(srv.device), "engine": srv.engine.snapshot(),
                "decode": srv.decode_snapshot(),
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_image_pixels": settings.max_image_pixels,
                           "max_images": settings.max_images,
                           "max_new_tokens": settings.max_new_tokens, "context": srv.model.cfg.lm_max_len,
                           "max_batch": settings.max_batch, "max_queue": settings.max_queue,
                           "request_timeout_s": settings.request_timeout}}

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": 0, "owned_by": "local"}]}
    return r
