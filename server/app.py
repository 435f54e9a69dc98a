"""The FastAPI app: middleware, the error answers, and the routers of generate.py, chat.py and
meta.py. The model loads in a background thread once the app starts (the port is open meanwhile)."""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import chat, generate, meta
from server.connection import MAX_HEADERS, header_limits
from server.errors import ApiError, language
from server.settings import Settings
from server.state import Server

log = logging.getLogger("serve")


class AbsoluteFormTargets:
    """RFC 9112 3.2.2: a server must accept absolute-form request targets ("POST http://host:8000/v1/...",
    as sent through an HTTP proxy); uvicorn passes them on as the path, so cut them to the path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(("http://", "https://")):
            path = urlsplit(scope["path"]).path or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


class HeaderChecks:
    """More than MAX_HEADERS header lines is 431 (their bytes are bounded in connection.py). A
    Transfer-Encoding other than plain `chunked` (`gzip, chunked`) is refused: the parser would
    drop the gzip and hand the app compressed bytes as the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            if len(scope["headers"]) > MAX_HEADERS:
                error = ApiError(431, "header_too_large", headers={"Connection": "close"}, **header_limits())
                return await error.response(language(headers))(scope, receive, send)
            coding = ",".join(headers.getlist("transfer-encoding"))
            if coding and coding.strip().lower() != "chunked":
                error = ApiError(400, "transfer_encoding", value=coding[:100], headers={"Connection": "close"})
                return await error.response(language(headers))(scope, receive, send)
        await self.app(scope, receive, send)


class JsonCors(CORSMiddleware):
    """Starlette's CORS, except that a refused preflight is our JSON error, not plain text."""

    def preflight_response(self, request_headers: Headers):
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        return ApiError(400, "cors").response(language(request_headers))


def create_app(settings: Settings, obj: dict | None = None) -> FastAPI:
    """obj: the checkpoint file if already read (serve.py reads it before the port opens)."""
    # The engine thread gives up the GIL inside every torch op; with the default 5 ms switch
    # interval it may then wait that long behind request parsing for each of them.
    sys.setswitchinterval(0.0005)
    srv = Server(settings, obj)

    @asynccontextmanager
    async def lifespan(app):
        srv.loop = asyncio.get_running_loop()
        threading.Thread(target=srv.load, name="load-model", daemon=True).start()
        yield
        if srv.engine:
            srv.engine.close()
        srv.decoder.shutdown(wait=False, cancel_futures=True)

    # No /docs: Swagger UI loads its scripts from a CDN (fails offline, tells a third party who
    # reads the docs); /openapi.json stays. No trailing-slash redirect: it trusted the Host header.
    app = FastAPI(title="VLM serve", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.server = srv
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    app.add_middleware(JsonCors, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], max_age=600)
    app.add_middleware(AbsoluteFormTargets)
    app.add_middleware(HeaderChecks)
    add_error_answers(app)
    for family in (meta, generate, chat):
        app.include_router(family.router(settings))
    return app


def add_error_answers(app: FastAPI):
    """Every error, ours or the framework's, in the API's JSON shape and the client's language."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response(language(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        fmt = {"method": request.method, "path": request.url.path}
        if e.status_code == 405:
            return ApiError(405, "method", **fmt).response(language(request))
        if e.status_code == 404:
            return ApiError(404, "not_found", **fmt).response(language(request))
        return ApiError(400, "json").response(language(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return ApiError(400, "json").response(language(request))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("request failed")
        return ApiError(500, "internal").response(language(request))
