"""The error catalogue: every error the API answers, with its HTTP status, code and message in
Chinese (the default) and English (when Accept-Language prefers it)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

RETRY_AFTER = 2                    # seconds, sent with 503 answers

MESSAGES = {
    "body_too_large": ("请求内容超过上限 {limit_mb:g} MB。请压缩或缩小图片后重试。",
                       "The request body exceeds the {limit_mb:g} MB limit. Compress or shrink the image and retry."),
    "text_too_large": ("请求里图片（base64）以外的内容超过上限 {limit_mb:g} MB。",
                       "The request's content other than images (base64) exceeds the {limit_mb:g} MB limit."),
    "body_aborted": ("请求内容没有传完，客户端已断开。", "The request body was cut short: the client disconnected."),
    "header_timeout": ("请求头没有在 {limit:g} 秒内传完，连接已关闭。", "The request headers did not arrive within {limit:g} s; the connection is closed."),
    "header_too_large": ("请求头太大或太多：上限是 {limit_kb} KB、{count} 行。", "The request headers are too large or too many: the limit is {limit_kb} KB and {count} lines."),
    "body_timeout": ("请求内容没有在 {limit:g} 秒内传完，连接已关闭。", "The request body did not arrive within {limit:g} s; the connection is closed."),
    "image_too_large": ("图片文件超过上限 {limit_mb:g} MB。请压缩或缩小图片后重试。",
                        "The image file exceeds the {limit_mb:g} MB limit. Compress or shrink it and retry."),
    "image_unreadable": ("无法识别这张图片：文件已损坏或不是图片。支持 JPEG、PNG、WEBP、GIF、BMP 和 TIFF（动图取第一帧）。",
                         "The image cannot be read: the file is broken or not an image. JPEG, PNG, WEBP, GIF, BMP and TIFF are supported (the first frame of an animation)."),
    "image_broken": ("图片数据不完整或已损坏，无法解码。请重新导出或换一张图片。",
                     "The image data is incomplete or damaged and cannot be decoded. Re-export it or use another image."),
    "image_pixels": ("图片太大：{size} 像素，上限是 {limit:,} 像素（宽×高）。请缩小后再上传。",
                     "The image is too large: {size} pixels, the limit is {limit:,} (width x height). Shrink it and retry."),
    "image_memory": ("图片解码需要约 {need_mb} MB 内存，上限是 {limit_mb} MB。请缩小后再上传。",
                     "Decoding the image needs about {need_mb} MB of memory, the limit is {limit_mb} MB. Shrink it and retry."),
    "image_scans": ("这张渐进式 JPEG 有 {scans} 次扫描，上限是 {limit}（解码太慢）。请另存为普通 JPEG 或 PNG 后再上传。",
                    "This progressive JPEG has {scans} scans, the limit is {limit} (too slow to decode). Save it as a baseline JPEG or PNG and retry."),
    "image_base64": ("图片的 base64 编码无效。请发送 base64 字符串或 data:image/...;base64,... 形式的 data URL。",
                     "The image is not valid base64. Send a base64 string or a data:image/...;base64,... URL."),
    "image_url": ("不支持的图片地址：只接受 data: URL（服务开启远程图片后也接受 http/https 地址）。",
                  "Unsupported image URL: only data: URLs are accepted (and http/https when the server allows remote images)."),
    "remote_disabled": ("服务器没有开启远程图片下载。请把图片编码成 data: URL 发送，或用 --allow-remote-images 启动服务。",
                        "This server does not fetch remote images. Send the image as a data: URL, or start the server with --allow-remote-images."),
    "remote_failed": ("下载图片失败：无法连接、超时、对方没有返回图片，或重定向到了不允许的地址（只能是公网的 http/https 地址）。",
                      "Downloading the image failed: no connection, a timeout, no image in the reply, or a redirect to a "
                      "disallowed address (only public http/https addresses)."),
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
    "duplicate_field": ("表单字段 {param} 出现了不止一次：每个字段只能发一次。",
                        "The form field {param} was sent more than once; send each field once."),
    "transfer_encoding": ("不支持的 Transfer-Encoding：{value}。只接受 chunked，或用 Content-Length 发送。",
                          "Unsupported Transfer-Encoding: {value}. Only chunked is accepted, or send a Content-Length."),
    "cors": ("跨域请求被拒绝：来源、方法或请求头不在允许之列。允许的网页来源用 --cors-origins（SERVE_CORS_ORIGINS）设置。",
             "Cross-origin request refused: the origin, method or headers are not allowed. Allowed page origins are set with --cors-origins (SERVE_CORS_ORIGINS)."),
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
TYPES = {**{status: "invalid_request_error" for status in (400, 404, 405, 408, 413, 415, 431)},
         500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, param: str | None = None, headers: dict | None = None, **fmt):
        super().__init__(code)
        self.status, self.code, self.param, self.headers, self.fmt = status, code, param, headers, fmt

    def payload(self, lang: str) -> dict:
        zh, en = MESSAGES[self.code]
        fmt = {"param": self.param, **self.fmt}
        if "expected" in fmt:
            fmt["expected"] = EXPECTED[fmt["expected"]][lang == "en"]
        message = (en if lang == "en" else zh).format(**fmt)
        return {"error": {"message": printable(message), "type": TYPES[self.status],
                          "param": None if self.param is None else printable(self.param), "code": self.code}}

    def response(self, lang: str) -> JSONResponse:
        return JSONResponse(self.payload(lang), self.status, headers=self.headers)


def printable(text: str) -> str:
    """Text a client sent, echoed in an answer, as valid UTF-8: a lone surrogate ("\\ud800" in
    JSON) becomes the escape \\ud800 instead of breaking the JSON encoder (a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def busy(code: str, **fmt) -> ApiError:
    return ApiError(503, code, headers={"Retry-After": str(RETRY_AFTER)}, retry=RETRY_AFTER, **fmt)


def language(request: Request | Headers) -> str:
    """'en' when Accept-Language prefers English over Chinese, else 'zh' (the default)."""
    best, best_q = "zh", 0.0
    for item in getattr(request, "headers", request).get("accept-language", "").split(","):
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


# Pydantic's own error types -> ours (protocol.py raises ours directly, with their ctx).
PYDANTIC = {"missing": ("missing", {}), "model_type": ("type", {"expected": "object"}),
            "model_attributes_type": ("type", {"expected": "object"}), "dict_type": ("type", {"expected": "object"}),
            "list_type": ("type", {"expected": "list"}), "too_short": ("type", {"expected": "list"}),
            "union_tag_invalid": ("part", {}), "union_tag_not_found": ("part", {}), "literal_error": ("role", {}),
            "string_unicode": ("encoding", {})}


def param_of(loc: tuple, tags=()) -> str | None:
    """('messages', 0, 'content', 1, 'image_url', 'url') -> 'messages[0].content[1].image_url.url';
    a union's tag right after an index is pydantic's, not the client's, and is dropped."""
    out = ""
    for i, key in enumerate(loc):
        if isinstance(key, int):
            out += f"[{key}]"
        elif not (i and isinstance(loc[i - 1], int) and key in tags):
            out += f".{key}" if out else str(key)
    return out or None


def from_validation(error: dict, tags=(), allowed=()) -> ApiError:
    """One error of a pydantic ValidationError as the API's error. `tags`: the union tags to drop
    from locations; `allowed`: the fields to list when an unknown one was sent."""
    kind, loc, ctx, raw = error["type"], tuple(error["loc"]), dict(error.get("ctx") or {}), error["input"]
    if kind == "extra_forbidden":
        return ApiError(400, "unknown_field", str(loc[-1])[:100], allowed=", ".join(allowed))
    if kind in PYDANTIC:                 # the messages need: what was sent as a role, or as a part's type
        kind, ctx = PYDANTIC[kind]
        ctx = {**ctx, "role": raw, "kind": raw.get("type") if isinstance(raw, dict) else None}
        loc += ("type",) if kind == "part" else ()
    if kind not in MESSAGES:             # a pydantic error this catalogue has no words for
        kind, ctx = "json", {}
    param = ctx.pop("param", None) or param_of(loc, tags) or str(raw)[:100]    # no location: a field's name
    if "at" in ctx:
        param += "." + ctx.pop("at")
    return ApiError(400, kind, param, **ctx)
