"""HTTP server for a trained checkpoint: multipart, JSON and OpenAI-compatible endpoints.

    export LLM_CHECKPOINT=checkpoints/vision_trained_model.pt
    python serve.py                      # http://127.0.0.1:8000, docs/api.md lists the endpoints
    python serve.py --reload             # restart on code changes (what `make serve-dev` runs)

Every flag has an environment variable (python serve.py --help). The port opens at once; the
model loads in the background and /health answers 503 until it is ready. A missing or broken
checkpoint stops start-up with one message. Requests go through engine.Engine, which decodes
concurrent requests together in one batch.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import codecs
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager
from urllib.parse import urlsplit
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser, parse_options_header

import checkpoint
import images
from engine import Engine, Job, QueueFull
from errors import ArgumentParser, UserError, cli
from tokenizer import IMAGE

log = logging.getLogger("serve")
HERE = Path(__file__).resolve().parent
DEFAULT_NEW_TOKENS = 128
MAX_IMAGES = 4                     # per request (each becomes cfg.image_tokens prompt tokens)
RETRY_AFTER = 2                    # seconds, sent with 503 answers

# ----------------------------------------------------------------------------- settings

# (name, environment variable, type, default, help)
OPTIONS = [
    ("checkpoint", "LLM_CHECKPOINT", str, "checkpoints/vision_trained_model.pt", "模型文件"),
    ("host", "SERVE_HOST", str, "127.0.0.1", "监听地址；要让其他机器访问用 0.0.0.0"),
    ("port", "SERVE_PORT", int, 8000, "端口"),
    ("device", "SERVE_DEVICE", str, "auto", "设备：auto / cpu / cuda / cuda:1 …"),
    ("dtype", "SERVE_DTYPE", str, "float32", "推理精度：float32 / bfloat16 / float16"),
    ("threads", "SERVE_THREADS", int, 0, "CPU 计算线程数；0 表示 CPU 核数的一半"),
    ("max_batch", "SERVE_MAX_BATCH", int, 16, "同时生成的最多请求数（一个批次）"),
    ("max_queue", "SERVE_MAX_QUEUE", int, 64, "排队等待的最多请求数；再多的请求得到 503"),
    ("request_timeout", "SERVE_REQUEST_TIMEOUT", float, 120.0, "每个请求的时间上限（秒，含排队）"),
    ("max_upload_mb", "SERVE_MAX_UPLOAD_MB", float, 20.0, "上传图片的大小上限（MB）"),
    ("max_image_pixels", "SERVE_MAX_IMAGE_PIXELS", int, images.MAX_PIXELS, "图片像素上限（宽×高），解码前检查"),
    ("max_prompt_chars", "SERVE_MAX_PROMPT_CHARS", int, 4000, "提示词（含对话历史）的字符数上限"),
    ("max_new_tokens", "SERVE_MAX_NEW_TOKENS", int, 512, "请求可要求的 max_new_tokens 上限"),
    ("cors_origins", "SERVE_CORS_ORIGINS", str, "http://localhost:3000,http://127.0.0.1:3000",
     "允许调用接口的网页来源，逗号分隔；* 表示全部"),
    ("allow_remote_images", "SERVE_ALLOW_REMOTE_IMAGES", bool, False,
     "允许 image_url 使用 http(s) 地址（服务器会去下载，默认关闭）"),
    ("model_name", "SERVE_MODEL_NAME", str, "", "接口里显示的模型名（默认取模型文件名）"),
    ("log_level", "SERVE_LOG_LEVEL", str, "info", "日志级别：debug / info / warning / error"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Settings:
    checkpoint: str
    host: str
    port: int
    device: str
    dtype: str
    threads: int
    max_batch: int
    max_queue: int
    request_timeout: float
    max_upload_mb: float
    max_image_pixels: int
    max_prompt_chars: int
    max_new_tokens: int
    cors_origins: str
    allow_remote_images: bool
    model_name: str
    log_level: str

    @property
    def max_upload(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.checkpoint).stem

    def validate(self):
        if self.dtype not in DTYPES:
            raise UserError(f"不支持的精度 {self.dtype!r}，可用：{', '.join(DTYPES)}。")
        for key in ("port", "max_batch", "max_image_pixels", "max_prompt_chars", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} 必须是正整数（现在是 {getattr(self, key)}）。")
        if self.max_queue < 0 or self.threads < 0:
            raise UserError("max_queue 和 threads 不能为负数。")
        if not self.request_timeout > 0 or not self.max_upload_mb > 0:
            raise UserError("request_timeout 和 max_upload_mb 必须大于 0。")
        return self


def env_value(env: str, kind, default):
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return kind(raw)
    except ValueError:
        raise UserError(f"环境变量 {env}={raw!r} 不是有效的{'整数' if kind is int else '数字'}。") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="看图说话模型的 HTTP 服务（multipart、JSON、OpenAI 兼容接口，流式输出，批量生成）。"
                                            "每个参数也可以用括号里的环境变量设置。")
    for name, env, kind, default, help_ in OPTIONS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=f"{help_}（{env}）")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"{help_}（{env}，默认 {default}）")
    p.add_argument("--reload", action="store_true", help="代码改动后自动重启（开发用，make serve-dev）")
    return p


def settings_from(args: argparse.Namespace | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    values = {}
    for name, env, kind, default, _ in OPTIONS:
        given = None if args is None else getattr(args, name)
        values[name] = given if given is not None else env_value(env, kind, default)
    return Settings(**values).validate()


# ----------------------------------------------------------------------------- errors

MESSAGES = {
    "body_too_large": ("请求内容超过上限 {limit_mb:g} MB。请压缩或缩小图片后重试。",
                       "The request body exceeds the {limit_mb:g} MB limit. Compress or shrink the image and retry."),
    "image_too_large": ("图片文件超过上限 {limit_mb:g} MB。请压缩或缩小图片后重试。",
                        "The image file exceeds the {limit_mb:g} MB limit. Compress or shrink it and retry."),
    "image_unreadable": ("无法识别这张图片：文件已损坏或不是图片。支持 JPEG、PNG、WEBP、GIF、BMP 和 TIFF（动图取第一帧）。",
                         "The image cannot be read: the file is broken or not an image. JPEG, PNG, WEBP, GIF, BMP and TIFF are supported (the first frame of an animation)."),
    "image_broken": ("图片数据不完整或已损坏，无法解码。请重新导出或换一张图片。",
                     "The image data is incomplete or damaged and cannot be decoded. Re-export it or use another image."),
    "image_pixels": ("图片太大：{size} 像素，上限是 {limit:,} 像素（宽×高）。请缩小后再上传。",
                     "The image is too large: {size} pixels, the limit is {limit:,} (width x height). Shrink it and retry."),
    "image_base64": ("图片的 base64 编码无效。请发送 base64 字符串或 data:image/...;base64,... 形式的 data URL。",
                     "The image is not valid base64. Send a base64 string or a data:image/...;base64,... URL."),
    "image_url": ("不支持的图片地址：只接受 data: URL（服务开启远程图片后也接受 http/https 地址）。",
                  "Unsupported image URL: only data: URLs are accepted (and http/https when the server allows remote images)."),
    "remote_disabled": ("服务器没有开启远程图片下载。请把图片编码成 data: URL 发送，或用 --allow-remote-images 启动服务。",
                        "This server does not fetch remote images. Send the image as a data: URL, or start the server with --allow-remote-images."),
    "remote_failed": ("下载图片失败：{detail}", "Downloading the image failed: {detail}"),
    "missing": ("缺少必填字段 {param}。", "The field {param} is required."),
    "type": ("字段 {param} 应为{expected}。", "The field {param} must be {expected}."),
    "range": ("字段 {param} 超出范围：应在 {lo} 到 {hi} 之间，收到的是 {value}。",
              "The field {param} is out of range: it must be between {lo} and {hi}, got {value}."),
    "prompt_chars": ("提示词太长：{n} 个字符，上限是 {limit}。", "The prompt is too long: {n} characters, the limit is {limit}."),
    "prompt_tokens": ("提示词太长：{n} 个 token（含图片），模型的上下文只有 {ctx} 个。",
                      "The prompt is too long: {n} tokens (images included), the model's context holds {ctx}."),
    "context": ("生成长度放不下：提示词已占 {n} 个 token，上下文共 {ctx} 个，{param} 最多为 {room}。",
                "The answer does not fit: the prompt takes {n} of the context's {ctx} tokens, so {param} can be at most {room}."),
    "image_markers": ("提示词里的 <image> 标记数与图片数（{images}）不符。", "The number of <image> markers in the prompt does not match the {images} image(s)."),
    "marker_in_text": ("消息文本里不能出现 <image>；图片请用 image_url 部分发送。",
                       "Message text must not contain <image>; send images as image_url parts."),
    "too_many_images": ("图片太多：一次最多 {limit} 张。", "Too many images: at most {limit} per request."),
    "role": ("不支持的消息角色 {role}：只支持 system、user、assistant。", "Unsupported message role {role}: use system, user or assistant."),
    "part": ("不支持的内容类型 {kind}：只支持 text 和 image_url。", "Unsupported content part type {kind}: use text or image_url."),
    "last_user": ("最后一条消息必须来自 user。", "The last message must come from the user."),
    "n": ("只支持 n=1。", "Only n=1 is supported."),
    "unknown_field": ("未知字段 {param}。可用的字段：{allowed}。", "Unknown field {param}. The accepted fields are: {allowed}."),
    "encoding": ("字段 {param} 含有无法编码为 UTF-8 的字符（如单独的代理项 \\ud800）。",
                 "The field {param} contains characters that cannot be encoded as UTF-8 (such as a lone surrogate \\ud800)."),
    "form_encoding": ("表单字段 {param} 不是合法的 UTF-8 文本，请用 UTF-8 编码发送。",
                      "The form field {param} is not valid UTF-8 text; send it encoded as UTF-8."),
    "form_charset": ("表单字段 {param} 声明的字符集是 {charset}，只支持 UTF-8，请用 UTF-8 编码发送。",
                     "The form field {param} declares the charset {charset}; only UTF-8 is supported, send it encoded as UTF-8."),
    "json": ("请求体不是合法的 JSON 对象。", "The request body is not a valid JSON object."),
    "multipart": ("表单数据无法解析，请用 multipart/form-data 上传。", "The form data cannot be parsed; upload it as multipart/form-data."),
    "content_type": ("Content-Type 应为 {ctype}。", "Content-Type must be {ctype}."),
    "queue_full": ("服务器繁忙：排队的请求已满，请 {retry} 秒后重试。", "The server is busy: the queue is full. Retry in {retry} s."),
    "queue_timeout": ("请求排队超过 {limit:g} 秒仍未轮到，请稍后重试。", "The request waited over {limit:g} s in the queue; retry later."),
    "loading": ("模型正在加载，请 {retry} 秒后重试。", "The model is still loading; retry in {retry} s."),
    "not_found": ("没有这个接口：{method} {path}。可用的接口见 docs/api.md。", "No such endpoint: {method} {path}. See docs/api.md."),
    "method": ("接口 {path} 不支持 {method} 方法。", "The endpoint {path} does not accept {method}."),
    "internal": ("服务器内部错误，这次生成失败了。请查看服务端日志。", "Internal server error: this generation failed. See the server log."),
}
EXPECTED = {"integer": ("整数", "an integer"), "number": ("数字", "a number"), "boolean": ("true 或 false", "true or false"),
            "string": ("字符串", "a string"), "list": ("非空列表", "a non-empty list"), "object": ("对象", "an object"),
            "file": ("图片文件", "an image file")}
TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, param: str | None = None, headers: dict | None = None, **fmt):
        super().__init__(code)
        self.status, self.code, self.param, self.headers, self.fmt = status, code, param, headers, fmt

    def payload(self, lang: str) -> dict:
        zh, en = MESSAGES[self.code]
        fmt = {"param": self.param, **self.fmt}
        if "expected" in fmt:
            fmt["expected"] = EXPECTED[fmt["expected"]][lang == "en"]
        return {"error": {"message": (en if lang == "en" else zh).format(**fmt), "type": TYPES[self.status],
                          "param": self.param, "code": self.code}}

    def response(self, lang: str) -> JSONResponse:
        return JSONResponse(self.payload(lang), self.status, headers=self.headers)


def busy(code: str, **fmt) -> ApiError:
    return ApiError(503, code, headers={"Retry-After": str(RETRY_AFTER)}, retry=RETRY_AFTER, **fmt)


def language(request: Request) -> str:
    """'en' when Accept-Language prefers English over Chinese, else 'zh' (the default)."""
    best, best_q = "zh", 0.0
    for item in request.headers.get("accept-language", "").split(","):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        code = tag.strip().lower()[:2]
        if code in ("zh", "en") and q > best_q:
            best, best_q = code, q
    return best


# ----------------------------------------------------------------------------- OpenAPI (/openapi.json)
# The endpoints parse their bodies by hand (for the error messages above); these schemas document
# what they accept and answer, so clients and fuzzers (tests/test_fuzz.py) see the real contract.

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}}
USAGE_SCHEMA = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
STREAM = {"text/event-stream": {"schema": {   # each server-sent event; its data is a JSON object or [DONE]
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}


def api_docs(settings: Settings, body: dict | None = None, ok: dict | None = None, errors=(400, 413, 415, 503)) -> dict:
    """Keyword arguments for app.get/app.post: the request body, the 200 answer and the errors."""
    responses = {code: {"description": "错误", "content": {"application/json": {"schema": ERROR_SCHEMA}}} for code in errors}
    if ok is not None:
        responses[200] = {"description": "成功", "content": ok}
    return {"responses": responses, **({"openapi_extra": {"requestBody": {"required": True, "content": body}}} if body else {})}


def sampling_props(settings: Settings, max_param="max_new_tokens", nullable=True) -> dict:
    """In JSON an optional field may also be null, which means "not given" (as OpenAI clients send it)."""
    props = {max_param: {"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens},
             "temperature": {"type": "number", "minimum": 0, "maximum": 2},
             "top_p": {"type": "number", "minimum": 0, "maximum": 1},
             "top_k": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
             "stream": {"type": "boolean"}}
    return {k: {**v, "type": [v["type"], "null"]} for k, v in props.items()} if nullable else props


def generate_docs(settings: Settings, form: bool) -> dict:
    props = {"prompt": {"type": "string", "maxLength": settings.max_prompt_chars},
             **sampling_props(settings, nullable=not form)}
    if form:
        props["image"] = {"type": "string", "format": "binary"}
        body = {"multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "properties": props,
                                                   "additionalProperties": False}}}
    else:
        props["image"] = {"type": ["string", "null"], "description": "base64 或 data:image/...;base64,... URL"}
        body = {"application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": props,
                                                "additionalProperties": False}}}
    ok = {"type": "object", "required": ["id", "object", "model", "text", "finish_reason", "usage"],
          "properties": {"id": {"type": "string"}, "object": {"const": "generation"}, "model": {"type": "string"},
                         "text": {"type": "string"}, "finish_reason": {"type": "string"}, "usage": USAGE_SCHEMA,
                         "timings": {"type": "object"}}}
    return api_docs(settings, body, {"application/json": {"schema": ok}, **STREAM})


def chat_docs(settings: Settings) -> dict:
    part = {"anyOf": [
        {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
        {"type": "object", "required": ["type", "image_url"], "properties": {
            "type": {"const": "image_url"},
            "image_url": {"anyOf": [{"type": "string"}, {"type": "object", "required": ["url"],
                                                         "properties": {"url": {"type": "string"}}}]}}}]}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    props = {"model": {"description": "不检查：这个服务只有一个模型"},
             "messages": {"type": "array", "minItems": 1, "items": message},
             "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
             "stream_options": {"type": ["object", "null"],
                                "properties": {"include_usage": {"type": ["boolean", "null"]}}},
             **sampling_props(settings, "max_tokens"),
             "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": settings.max_new_tokens}}
    choice = {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
        "index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length"]},
        "message": {"type": "object", "required": ["role", "content"],
                    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}}
    ok = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": choice}, "usage": USAGE_SCHEMA}}
    body = {"application/json": {"schema": {"type": "object", "required": ["messages"], "properties": props}}}
    return api_docs(settings, body, {"application/json": {"schema": ok}, **STREAM})


# ----------------------------------------------------------------------------- request parsing

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 past `limit`. An oversized body is still read (up to 4x the
    limit) so the client gets the JSON answer instead of a reset connection."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, "body_too_large", limit_mb=round(limit / 2 ** 20, 1))
    if declared.isdigit() and int(declared) > 4 * limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 4 * limit:
            break
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
    """Starlette's multipart parser, except that a text field must be UTF-8. Starlette would decode
    invalid bytes (or a field declared charset=gbk) as Latin-1 and hand the model mojibake."""

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


def number(raw, param: str, kind, lo, hi, from_form=False):
    """raw -> int/float within [lo, hi]; form fields arrive as strings, JSON must use numbers."""
    expected = "integer" if kind is int else "number"
    if from_form and isinstance(raw, str):
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ApiError(400, "type", param, expected=expected) from None
    elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ApiError(400, "type", param, expected=expected)
    elif kind is int and isinstance(raw, float):
        if not raw.is_integer():
            raise ApiError(400, "type", param, expected=expected)
        value = int(raw)
    else:
        value = kind(raw)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, "range", param, lo=lo, hi=hi, value=raw)
    return value


def boolean(raw, param: str, from_form=False) -> bool:
    if isinstance(raw, bool):
        return raw
    if from_form and isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return raw.strip().lower() in ("true", "1", "yes", "on")
    raise ApiError(400, "type", param, expected="boolean")


def text(raw, param: str, required=True) -> str | None:
    if raw is None:
        if required:
            raise ApiError(400, "missing", param)
        return None
    if not isinstance(raw, str):
        raise ApiError(400, "type", param, expected="string")
    try:
        raw.encode("utf-8")                      # JSON may carry lone surrogates ("\ud800")
    except UnicodeEncodeError:
        raise ApiError(400, "encoding", param) from None
    return raw


GENERATE_FIELDS = ("prompt", "image", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stream")


def known_fields(names):
    """/v1/generate and the form take no other fields: a misspelt one (max_tokens) is an error,
    not a silently ignored setting."""
    for name in names:
        if name not in GENERATE_FIELDS:
            raise ApiError(400, "unknown_field", str(name)[:100], allowed=", ".join(GENERATE_FIELDS))


@dataclass
class Sampling:
    max_new_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    max_param: str = "max_new_tokens"


def sampling(fields: dict, settings: Settings, vocab: int, from_form=False, max_param="max_new_tokens") -> Sampling:
    get = lambda k, *rest: (lambda v: None if v is None else number(v, k, *rest, from_form=from_form))(fields.get(k))
    s = Sampling(get(max_param, int, 1, settings.max_new_tokens), max_param=max_param)
    s.temperature = get("temperature", float, 0.0, 2.0) if fields.get("temperature") is not None else 0.0
    s.top_p = get("top_p", float, 0.0, 1.0) if fields.get("top_p") is not None else 1.0
    s.top_k = get("top_k", int, 0, vocab) if fields.get("top_k") is not None else 0
    s.seed = get("seed", int, 0, 2 ** 63 - 1)
    if fields.get("stream") is not None:
        s.stream = boolean(fields["stream"], "stream", from_form)
    return s


def image_pixels(data: bytes, settings: Settings, cfg, param: str) -> torch.Tensor:
    """Bytes -> the model's pixel tensor, through the same path as training (images.py). The file
    size and the header (pixel count) are checked before any pixel is decoded; anything wrong
    with the file is a 400/413, never a 500."""
    if len(data) > settings.max_upload:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    try:
        return images.pixels(data, cfg, images.ImagePolicy(settings.max_image_pixels))
    except images.BadImage as e:
        code = {"pixels": "image_pixels", "broken": "image_broken"}.get(e.code, "image_unreadable")
        raise ApiError(400, code, param, **e.info) from None


def image_bytes(ref: str, settings: Settings, param: str) -> bytes:
    """A data: URL, plain base64, or (only when enabled) an http(s) URL -> the file's bytes."""
    if ref.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, "remote_disabled", param)
        return fetch(ref, settings, param)
    if ref.startswith("data:"):
        header, comma, ref = ref.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "image_base64", param)
    elif "://" in ref[:16]:
        raise ApiError(400, "image_url", param)
    ref = "".join(ref.split())
    if len(ref) * 3 // 4 > settings.max_upload + 3:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    try:
        return base64.b64decode(ref, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_base64", param) from None


def fetch(url: str, settings: Settings, param: str) -> bytes:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "vlm-serve"}), timeout=10) as r:
            data = r.read(settings.max_upload + 1)
    except Exception as e:
        raise ApiError(400, "remote_failed", param, detail=str(getattr(e, "reason", e))) from None
    if len(data) > settings.max_upload:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    return data


def chat_messages(body: dict) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> the training template's turns, with an <image> marker where each
    image_url part stood; system text goes in front of the first user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "missing" if messages is None else "type", "messages", expected="list")
    turns, images, system = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, "type", f"messages[{i}]", expected="object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, "role", f"messages[{i}].role", role=role)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, "type", f"messages[{i}].content", expected="string")
        chunks = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                t = text(part.get("text"), where + ".text")
                if IMAGE in t:
                    raise ApiError(400, "marker_in_text", where + ".text")
                chunks.append(t)
            elif kind == "image_url" and role == "user":
                ref = part.get("image_url")
                ref = ref.get("url") if isinstance(ref, dict) else ref
                images.append((text(ref, where + ".image_url.url"), where + ".image_url"))
                chunks.append(IMAGE)
            else:
                raise ApiError(400, "part", where + ".type", kind=kind)
        if role == "system":
            system.append("".join(chunks))
        else:
            turns.append({"role": role, "content": "".join(chunks)})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "last_user", "messages")
    if system:
        first = next(t for t in turns if t["role"] == "user")
        first["content"] = "\n".join(system) + "\n" + first["content"]
    if len(images) > MAX_IMAGES:
        raise ApiError(400, "too_many_images", "messages", limit=MAX_IMAGES)
    return turns, images


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


# ----------------------------------------------------------------------------- the app

def load_model(settings: Settings, obj: dict | None):
    """(model, tokenizer, meta) on the chosen device; obj is the already-read checkpoint file."""
    from trainer import resolve_device
    device = resolve_device(settings.device)
    if obj is None:
        obj = checkpoint.read_file(settings.checkpoint)
    model, tok = checkpoint.model_from_dict(obj, settings.checkpoint)
    model = model.to(device=device, dtype=DTYPES[settings.dtype]).eval()
    return model, tok, obj.get("meta", {})


class Server:
    """What the endpoints share: settings, the model once loaded, the engine."""

    def __init__(self, settings: Settings, obj: dict | None = None):
        self.settings, self.obj = settings, obj
        self.model = self.tok = self.engine = self.loop = None
        self.meta, self.ready, self.failed = {}, False, False
        self.on_fatal = lambda: os._exit(2)

    def load(self):
        """Background thread: load, warm up, start the engine; a bad file ends the process."""
        try:
            s = self.settings
            torch.set_num_threads(s.threads or max(1, (os.cpu_count() or 2) // 2))
            self.model, self.tok, self.meta = load_model(s, self.obj)
            self.obj = None
            stop = {self.tok.eos_id} | ({self.tok.user_id} if hasattr(self.tok, "user_id") else set())
            with torch.inference_mode():                          # first call allocates; do it now
                ids = torch.tensor([self.tok.encode_chat([{"role": "user", "content": "hi"}], 0, 0, True)[0]])
                next(iter(self.model.generate(ids.to(next(self.model.parameters()).device), max_new_tokens=1)))
            never = {getattr(self.tok, k, None) for k in ("image_id", "pad_id", "bos_id", "assistant_id")} - stop - {None}
            self.engine = Engine(self.model, stop, s.max_batch, s.max_queue, self.publish, banned=never).start()
            self.ready = True
            log.info("model %s ready on %s", s.checkpoint, next(self.model.parameters()).device)
        except UserError as e:
            print(f"错误：{e}", file=sys.stderr, flush=True)
            self.failed = True
            self.on_fatal()
        except Exception:                     # a bug or the device failing: keep the traceback
            log.exception("错误：模型加载失败")
            self.failed = True
            self.on_fatal()

    def publish(self, events):
        """Engine thread -> event loop: hand each job its events."""
        def deliver():
            for job, kind, value in events:
                job.inbox.put_nowait((kind, value))
        self.loop.call_soon_threadsafe(deliver)

    def require_ready(self):
        if not self.ready:
            raise busy("loading")

    def prompt_ids(self, turns: list[dict], n_images: int, param: str) -> list[int]:
        chars = sum(len(t["content"]) for t in turns)
        if chars > self.settings.max_prompt_chars:
            raise ApiError(400, "prompt_chars", param, n=chars, limit=self.settings.max_prompt_chars)
        try:
            ids, _ = self.tok.encode_chat(turns, self.model.cfg.image_tokens, n_images, add_generation_prompt=True)
        except ValueError:
            raise ApiError(400, "image_markers", param, images=n_images) from None
        ctx = self.model.cfg.lm_max_len
        if len(ids) >= ctx:
            raise ApiError(400, "prompt_tokens", param, n=len(ids), ctx=ctx)
        return ids

    def pixels(self, blobs: list[tuple[bytes, str]]):
        """Decode and preprocess images (runs in a worker thread)."""
        if not blobs:
            return None
        return torch.stack([image_pixels(b, self.settings, self.model.cfg, p) for b, p in blobs])

    async def start(self, ids, pixels, opt: Sampling) -> Job:
        ctx, room = self.model.cfg.lm_max_len, self.model.cfg.lm_max_len - len(ids)
        n = opt.max_new_tokens
        if n is None:
            n = min(DEFAULT_NEW_TOKENS, self.settings.max_new_tokens, room)
        elif n > room:
            raise ApiError(400, "context", opt.max_param, n=len(ids), ctx=ctx, room=room)
        job = Job(ids, pixels, n, opt.temperature, opt.top_k, opt.top_p, opt.seed,
                  timeout=self.settings.request_timeout, stream=opt.stream)
        job.inbox = asyncio.Queue()
        try:
            self.engine.submit(job)
        except QueueFull:
            raise busy("queue_full") from None
        return job

    async def next_event(self, job: Job, request: Request):
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

    def check_outcome(self, job: Job):
        if job.finish_reason == "queue_timeout":
            raise busy("queue_timeout", limit=self.settings.request_timeout)
        if job.finish_reason in ("error", "cancelled"):
            raise ApiError(500, "internal")


async def wait_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.ids) + len(job.tokens)}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


def create_app(settings: Settings, obj: dict | None = None) -> FastAPI:
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

    app = FastAPI(title="VLM serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = srv
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], max_age=600)
    app.add_middleware(AbsoluteFormTargets)

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

    @app.get("/health", **api_docs(settings, ok={"application/json": {"schema": {
        "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}, errors=(503,)))
    async def health(request: Request):
        if not srv.ready:
            return JSONResponse({"status": "loading", **busy("loading").payload(language(request))}, 503,
                                headers={"Retry-After": str(RETRY_AFTER)})
        return {"status": "ok", "model": settings.name, "device": str(next(srv.model.parameters()).device),
                "engine": srv.engine.snapshot(),
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_image_pixels": settings.max_image_pixels,
                           "max_new_tokens": settings.max_new_tokens, "context": srv.model.cfg.lm_max_len,
                           "max_batch": settings.max_batch, "max_queue": settings.max_queue,
                           "request_timeout_s": settings.request_timeout}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": 0, "owned_by": "local"}]}

    async def generate(request: Request, prompt: str, blobs: list, opt: Sampling):
        pixels = await run_in_threadpool(srv.pixels, blobs)
        ids = srv.prompt_ids([{"role": "user", "content": prompt}], len(blobs), "prompt")
        job = await srv.start(ids, pixels, opt)
        rid = "gen-" + uuid.uuid4().hex[:24]

        def result(text):
            return {"id": rid, "object": "generation", "model": settings.name, "text": text,
                    "finish_reason": job.finish_reason, "usage": usage(job), "timings": job.timings()}
        if not opt.stream:
            if await srv.next_event(job, request) is None:
                return Response(status_code=499)
            srv.check_outcome(job)
            return result(srv.tok.decode(job.tokens))
        first = await srv.next_event(job, request)
        if first is None:
            return Response(status_code=499)
        if first[0] == "done":
            srv.check_outcome(job)

        async def body():
            out = TextStream(srv.tok)
            event = first
            try:
                while True:
                    kind, value = event
                    if kind == "token":
                        if piece := out.push(value):
                            yield sse({"id": rid, "text": piece})
                    else:
                        if piece := out.close():
                            yield sse({"id": rid, "text": piece})
                        failed = job.finish_reason in ("error", "cancelled")
                        yield sse(ApiError(500, "internal").payload(language(request)) if failed else result(""))
                        yield "data: [DONE]\n\n"
                        return
                    event = await job.inbox.get()
            finally:
                job.cancel()                     # a no-op once finished; frees the slot if the client left
        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/generate-multipart", **generate_docs(settings, form=True))
    async def generate_multipart(request: Request):
        srv.require_ready()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "content_type", ctype="multipart/form-data")
        await read_body(request, settings.max_upload + 2 ** 20)
        try:
            form = await Utf8FormParser(request.headers, request.stream(), max_files=MAX_IMAGES, max_fields=32).parse()
        except ApiError:
            raise
        except Exception:
            raise ApiError(400, "multipart") from None
        known_fields(form.keys())
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        prompt = text(fields.get("prompt"), "prompt")
        opt = sampling(fields, settings, srv.model.cfg.lm_vocab_size, from_form=True)
        blobs = []
        for upload in form.getlist("image"):
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "type", "image", expected="file")
            blobs.append((await upload.read(), "image"))
        return await generate(request, prompt, blobs, opt)

    async def json_body(request: Request, limit: int) -> dict:
        ctype = request.headers.get("content-type", "application/json")
        if not ctype.startswith("application/json"):
            raise ApiError(415, "content_type", ctype="application/json")
        raw = await read_body(request, limit)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):    # RecursionError: nested too deeply
            raise ApiError(400, "json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "json")
        return body

    json_limit = lambda n: (settings.max_upload * 4 // 3 + 4) * n + 2 ** 20   # base64 of n images + text

    @app.post("/v1/generate", **generate_docs(settings, form=False))
    async def generate_json(request: Request):
        srv.require_ready()
        body = await json_body(request, json_limit(1))
        known_fields(body)
        prompt = text(body.get("prompt"), "prompt")
        opt = sampling(body, settings, srv.model.cfg.lm_vocab_size)
        ref = text(body.get("image"), "image", required=False)
        blobs = [(image_bytes(ref, settings, "image"), "image")] if ref else []
        return await generate(request, prompt, blobs, opt)

    @app.post("/v1/chat/completions", **chat_docs(settings))
    async def chat(request: Request):
        srv.require_ready()
        body = await json_body(request, json_limit(MAX_IMAGES))
        if body.get("n") is not None and (isinstance(body["n"], bool) or body["n"] != 1):
            raise ApiError(400, "n", "n")
        options = {} if body.get("stream_options") is None else body["stream_options"]
        if not isinstance(options, dict):
            raise ApiError(400, "type", "stream_options", expected="object")
        include_usage = options.get("include_usage") is not None and boolean(options["include_usage"],
                                                                             "stream_options.include_usage")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if key == "max_completion_tokens" and body.get("max_tokens") is not None:     # checked even when unused
            number(body["max_tokens"], "max_tokens", int, 1, settings.max_new_tokens)
        opt = sampling(body, settings, srv.model.cfg.lm_vocab_size, max_param=key)
        turns, refs = chat_messages(body)
        blobs = [(await run_in_threadpool(image_bytes, ref, settings, where), where) for ref, where in refs]
        pixels = await run_in_threadpool(srv.pixels, blobs)
        ids = srv.prompt_ids(turns, len(blobs), "messages")
        job = await srv.start(ids, pixels, opt)
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        reason = lambda: "stop" if job.finish_reason == "stop" else "length"
        head = {"id": rid, "created": created, "model": settings.name}
        if not opt.stream:
            if await srv.next_event(job, request) is None:
                return Response(status_code=499)
            srv.check_outcome(job)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": srv.tok.decode(job.tokens)},
                                 "finish_reason": reason(), "logprobs": None}],
                    "usage": usage(job)}
        first = await srv.next_event(job, request)
        if first is None:
            return Response(status_code=499)
        if first[0] == "done":
            srv.check_outcome(job)
        chunk = lambda delta, finish=None: sse({**head, "object": "chat.completion.chunk",
                                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                             "logprobs": None}]})

        async def body_stream():
            out = TextStream(srv.tok)
            event = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = event
                    if kind == "token":
                        if piece := out.push(value):
                            yield chunk({"content": piece})
                    else:
                        if piece := out.close():
                            yield chunk({"content": piece})
                        if job.finish_reason in ("error", "cancelled"):
                            yield sse(ApiError(500, "internal").payload(language(request)))
                        else:
                            yield chunk({}, reason())
                            if include_usage:
                                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(job)})
                        yield "data: [DONE]\n\n"
                        return
                    event = await job.inbox.get()
            finally:
                job.cancel()
        return StreamingResponse(body_stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def app_from_env() -> FastAPI:
    """Factory for `--reload` (uvicorn imports this module again in a worker process)."""
    settings = settings_from()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:  %(name)s %(message)s")
    return create_app(settings)


def read_checkpoint(settings: Settings) -> dict:
    """The checkpoint file, checked before the port opens. Errors say how to get a model."""
    try:
        return checkpoint.read_file(settings.checkpoint)
    except UserError as e:
        hint = "" if "python train_vision.py" in str(e) else "训练一个模型：python train_vision.py；"
        raise UserError(f"{e}（{hint}用 LLM_CHECKPOINT=路径 或 --checkpoint 路径 指定模型文件。）") from None


@cli
def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    from trainer import resolve_device
    resolve_device(settings.device)                   # a bad --device fails here, not in the background
    obj = read_checkpoint(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:  %(name)s %(message)s")
    if args.reload:
        del obj
        logging.getLogger("watchfiles").setLevel(logging.WARNING)    # no line for every file saved
        for name, env, kind, _, _ in OPTIONS:           # the worker process reads its settings from here
            value = getattr(settings, name)
            os.environ[env] = ("1" if value else "") if kind is bool else str(value)
        uvicorn.run("serve:app_from_env", factory=True, host=settings.host, port=settings.port, reload=True,
                    reload_dirs=[str(HERE)], reload_includes=["*.py"], log_level=settings.log_level,
                    reload_excludes=[".venv", "data", "checkpoints", "web", "tests"],
                    timeout_graceful_shutdown=3)
        return
    app = create_app(settings, obj)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=3))
    app.state.server.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.server.failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
