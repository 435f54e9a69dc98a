"""Reading a request body: a size limit that answers 413 (not a reset connection), JSON that must
be an object, and multipart forms whose text fields must be UTF-8."""
from __future__ import annotations

import asyncio
import codecs
import json

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from server.errors import ApiError


TEXT_LIMIT = 2 ** 20          # a JSON body's bytes that are not base64 (images): text, numbers, structure
INLINE_PARSE = 2 ** 16        # larger JSON bodies are parsed in a worker thread, off the event loop
BODY_SECONDS = 5.0            # the least time a body may take (more when --request-timeout is longer)
BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 past `limit`, or 408 when it has not all arrived within the
    request's time limit (at least BODY_SECONDS) (a body announced longer than sent, or trickled a byte a second). An
    oversized body is still read (up to 4x the limit) so the client gets the JSON answer
    instead of a reset connection."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, "body_too_large", limit_mb=round(limit / 2 ** 20, 1))
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_big
    seconds = max(BODY_SECONDS, request.app.state.server.settings.request_timeout)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > 4 * limit:
                    break
    except TimeoutError:
        raise ApiError(408, "body_timeout", headers={"Connection": "close"}, limit=seconds) from None
    except ClientDisconnect:             # an aborted upload: expected, no traceback in the log
        raise ApiError(400, "body_aborted") from None
    if size > limit:
        raise too_big
    request._body = b"".join(chunks)             # lets request.stream() replay what was read
    return request._body


def declared_charset(content_type) -> str | None:
    """The charset a Content-Type header names, as written, or None when it names none."""
    raw = parse_options_header(content_type)[1].get(b"charset")
    return None if raw is None else raw.decode("latin-1").strip()[:40]


def is_utf8(charset: str) -> bool:
    try:
        return codecs.lookup(charset).name in ("utf-8", "ascii")     # 'UTF8', 'us-ascii', ...
    except LookupError:
        return False


class Utf8FormParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field must be UTF-8 (Starlette would decode
    invalid bytes, or a field declared charset=gbk, as Latin-1 and hand the model mojibake), and
    one file past max_files is the request's image limit, said as such."""

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException:
            if self._current_files > self.max_files:
                raise ApiError(400, "too_many_images", "image", limit=self.max_files) from None
            raise

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:                # an upload: kept as bytes
            return super().on_part_end()
        name = part.field_name[:100]
        charset = (declared_charset(dict(part.item_headers).get(b"content-type"))
                   or declared_charset(self.headers.get("content-type")))
        if charset is not None and not is_utf8(charset):
            raise ApiError(400, "form_charset", name, charset=charset)
        try:
            self.items.append((part.field_name, part.data.decode("utf-8")))
        except UnicodeDecodeError:
            raise ApiError(400, "form_encoding", name) from None


def require_media_type(request: Request, expected: str, default: str = ""):
    """415 unless the Content-Type names exactly `expected` (case-insensitively, parameters
    aside): `Application/JSON` is JSON, `application/json-patch+json` is not."""
    given = request.headers.get("content-type", default).partition(";")[0].strip().lower()
    if given != expected:
        raise ApiError(415, "content_type", ctype=expected)


async def json_body(request: Request, limit: int) -> dict:
    require_media_type(request, "application/json", default="application/json")
    raw = await read_body(request, limit)
    return parse_json(raw) if len(raw) <= INLINE_PARSE else await asyncio.to_thread(parse_json, raw)


def parse_json(raw: bytes) -> dict:
    """A JSON object. Past TEXT_LIMIT, only base64 may make a body big: the bytes outside the
    base64 alphabet (counted before parsing, 1 MB at a time) must fit TEXT_LIMIT, so a big body
    of `{}` or numbers is refused before it becomes millions of Python objects."""
    if len(raw) > TEXT_LIMIT:
        other = sum(len(raw[i:i + TEXT_LIMIT].translate(None, BASE64)) for i in range(0, len(raw), TEXT_LIMIT))
        if other > TEXT_LIMIT:
            raise ApiError(413, "text_too_large", limit_mb=TEXT_LIMIT / 2 ** 20)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):    # RecursionError: nested too deeply
        raise ApiError(400, "json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "json")
    return body


async def form_body(request: Request, limit: int, max_files: int):
    """The multipart form (uploads kept as files), or 415/413/400."""
    require_media_type(request, "multipart/form-data")
    await read_body(request, limit)
    try:
        form = await Utf8FormParser(request.headers, request.stream(), max_files=max_files, max_fields=32).parse()
    except ApiError:
        raise
    except Exception:
        raise ApiError(400, "multipart") from None
    for name in {k for k, v in form.multi_items() if isinstance(v, str)}:
        if len(form.getlist(name)) > 1:          # not last-wins: which one did the client mean?
            raise ApiError(400, "duplicate_field", name[:100])
    return form
