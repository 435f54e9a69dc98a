"""What the endpoints accept and answer, declared once: these models validate every request body
(with the error codes of errors.py) and are the schemas /openapi.json documents.

A field type here carries its own rule: Number(int, 1, "max_new_tokens") checks a value and
writes {"type": "integer", "minimum": 1, "maximum": ...} into the schema. A bound known only at
run time (the server's --max-new-tokens, the model's vocabulary) is named: validation takes it
from the context parse() passes, the schema from schema_of(model, limits). In JSON an optional
field may be null, which means "not given" (as OpenAI clients send it); a form sends text.
"""
from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationInfo,
                      create_model, model_validator)
from pydantic_core import PydanticCustomError, ValidationError, core_schema

from server.errors import from_validation
from tokenizer import IMAGE

SEED_MAX = 2 ** 63 - 1
FORM_TRUE, FORM_FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def fail(code: str, **ctx) -> PydanticCustomError:
    """A validation error with one of errors.py's codes; ctx fills its message (and may name a
    `param` path or an `at` suffix when the error's location alone does not say it)."""
    return PydanticCustomError(code, code, ctx)


class Rule:
    """A field type defined by one check function and one JSON schema (nullable: null = not given)."""
    nullable = True

    def check(self, raw, info: ValidationInfo):
        raise NotImplementedError

    def schema(self) -> dict:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source, handler):
        def validate(raw, info):
            return None if raw is None else self.check(raw, info)
        return core_schema.with_info_plain_validator_function(validate)

    def __get_pydantic_json_schema__(self, _core, _handler):
        s = self.schema()
        return {**s, "type": [s["type"], "null"]} if self.nullable else s


class Number(Rule):
    """An int or float within [lo, hi]; hi may name a run-time limit. JSON must send a number
    (2.0 counts as the integer 2); a form sends text."""

    def __init__(self, kind, lo, hi):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.expected = "integer" if kind is int else "number"

    def check(self, raw, info):
        try:
            value = self.convert(raw, (info.context or {}).get("form"))
        except OverflowError:               # float() of an integer with hundreds of digits
            value, raw = math.inf, f"{str(raw)[:20]}…"
        hi = (info.context or {}).get(self.hi) if isinstance(self.hi, str) else self.hi
        hi = math.inf if hi is None else hi
        if not (math.isfinite(value) and self.lo <= value <= hi):
            raise fail("range", lo=self.lo, hi=hi, value=raw)
        return value

    def convert(self, raw, form: bool):
        if form and isinstance(raw, str):
            try:
                return self.kind(raw.strip())
            except ValueError:
                raise fail("type", expected=self.expected) from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise fail("type", expected=self.expected)
        if self.kind is int and isinstance(raw, float):
            if not raw.is_integer():
                raise fail("type", expected=self.expected)
            return int(raw)
        return self.kind(raw)

    def schema(self):
        s = {"type": self.expected, "minimum": self.lo}
        if isinstance(self.hi, str):
            s["x-limit"] = self.hi           # schema_of() writes the limit's value as "maximum"
        elif self.hi is not None:
            s["maximum"] = self.hi
        return s


class Flag(Rule):
    """true/false; a form may also say 1/0, yes/no, on/off."""

    def check(self, raw, info):
        if isinstance(raw, bool):
            return raw
        if (info.context or {}).get("form") and isinstance(raw, str) and raw.strip().lower() in FORM_TRUE + FORM_FALSE:
            return raw.strip().lower() in FORM_TRUE
        raise fail("type", expected="boolean")

    def schema(self):
        return {"type": "boolean"}


class Text(Rule):
    """A string that is valid UTF-8 (JSON may carry lone surrogates: "\\ud800"); optionally
    without the <image> marker, which only the server places. max_chars names the limit the
    schema shows as maxLength; the count itself is checked on the whole prompt, history
    included (runner.prompt_ids)."""

    def __init__(self, max_chars: str | None = None, no_marker=False, description: str | None = None):
        self.max_chars, self.no_marker, self.description = max_chars, no_marker, description

    def check(self, raw, info):
        if not isinstance(raw, str):
            raise fail("type", expected="string")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise fail("encoding") from None
        if self.no_marker and IMAGE in raw:
            raise fail("marker_in_text")
        return raw

    def schema(self):
        return {"type": "string", **({"x-limit-chars": self.max_chars} if self.max_chars else {}),
                **({"description": self.description} if self.description else {})}


class Uploads(Rule):
    """The form's image files, the field repeated once per image (a text field of that name is a
    mistake); their number is checked while the form is parsed (bodies.Utf8FormParser)."""

    def check(self, raw, info):
        if any(isinstance(f, str) for f in raw):
            raise fail("type", expected="file")
        return raw

    def schema(self):
        return {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "图片文件；几张图就把 image 字段重复几次，按顺序放在问题前面"}


class OnlyOne(Rule):
    """OpenAI's n (answers per request): only 1."""

    def check(self, raw, info):
        if isinstance(raw, bool) or raw != 1:
            raise fail("n")
        return raw

    def schema(self):
        return {"type": "integer", "minimum": 1, "maximum": 1}


def required(rule: Rule):
    """A field that must be given: null or absent is `missing`."""
    rule = copy.copy(rule)
    rule.nullable = False
    return Annotated[Any, rule, BeforeValidator(lambda v: v if v is not None else _missing())]


def _missing():
    raise PydanticCustomError("missing", "missing")


# ----------------------------------------------------------------------------- requests

ANSWER_LENGTH = Annotated[Any, Number(int, 1, "max_new_tokens")]


def sampling(length_field="max_new_tokens") -> dict:
    """The generation settings every generating endpoint takes (fields for create_model)."""
    return {length_field: (ANSWER_LENGTH, None),
            "temperature": (Annotated[Any, Number(float, 0.0, 2.0)], None),
            "top_p": (Annotated[Any, Number(float, 0.0, 1.0)], None),
            "top_k": (Annotated[Any, Number(int, 0, "vocab")], None),
            "seed": (Annotated[Any, Number(int, 0, SEED_MAX)], None),
            "stream": (Annotated[Any, Flag()], None)}


class Generating(BaseModel):
    """What the runner needs from any generating request: length() and the sampling fields."""

    def length(self) -> tuple[int | None, str]:
        """(the requested answer length or None, the field that asked for it)."""
        return self.max_new_tokens, "max_new_tokens"


class Closed(Generating):
    model_config = ConfigDict(extra="forbid")


# POST /v1/generate and /v1/generate-multipart: a prompt and at most one image. No other
# field: a misspelt one (max_tokens) is an error, not a silently ignored setting.
GenerateRequest = create_model(
    "GenerateRequest", __base__=Closed, prompt=(required(Text("max_prompt_chars")), ...),
    image=(Annotated[Any, Text(description="base64 或 data:image/...;base64,... URL")], None), **sampling())
GenerateForm = create_model("GenerateForm", __base__=Closed, prompt=(required(Text("max_prompt_chars")), ...),
                            image=(Annotated[list, Uploads()], []), **sampling())


# ----------------------------------------------------------------------------- chat (OpenAI)

class TextPart(BaseModel):
    type: Literal["text"]
    text: required(Text(no_marker=True))


def url_object(raw):
    """image_url may be the URL itself or {"url": ...}; either way the URL is checked as .url."""
    return raw if isinstance(raw, dict) else {"url": raw}


class ImageURL(BaseModel):
    url: required(Text())


class ImagePart(BaseModel):
    model_config = ConfigDict(json_schema_extra={"required": ["type", "image_url"]})
    type: Literal["image_url"]
    image_url: Annotated[ImageURL, BeforeValidator(url_object, json_schema_input_type=Union[str, ImageURL]),
                         Field(validate_default=True)] = None


def part_kind(raw):
    return raw.get("type") if isinstance(raw, dict) else getattr(raw, "type", None)


Part = Annotated[Union[Annotated[TextPart, Tag("text")], Annotated[ImagePart, Tag("image_url")]],
                 Discriminator(part_kind)]
PART_TAGS = ("text", "image_url")      # pydantic puts the tag into an error's location; errors.py drops it


def as_parts(raw):
    if isinstance(raw, str):
        return [{"type": "text", "text": raw}]
    if not isinstance(raw, list):
        raise fail("type", expected="string")
    return raw


class Message(BaseModel):
    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})
    role: Annotated[Literal["system", "user", "assistant"], Field(validate_default=True)] = None
    content: Annotated[list[Part], BeforeValidator(as_parts, json_schema_input_type=Union[str, list[Part]]),
                       Field(validate_default=True)] = None

    def text(self) -> str:
        return "".join(p.text if p.type == "text" else IMAGE for p in self.content)

    @model_validator(mode="after")
    def images_only_from_the_user(self):
        for j, part in enumerate(self.content):
            if part.type == "image_url" and self.role != "user":
                raise fail("part", kind=part.type, at=f"content[{j}].type")
        return self


class StreamOptions(BaseModel):
    include_usage: Annotated[Any, Flag()] = None


class ChatBase(Generating):
    def length(self):
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @model_validator(mode="after")
    def a_question_last(self, info: ValidationInfo):
        said = [m for m in self.messages if m.role != "system"]
        if not said or said[-1].role != "user":
            raise fail("last_user", param="messages")
        limit = (info.context or {}).get("max_images")
        if limit is not None and sum(p.type == "image_url" for m in self.messages for p in m.content) > limit:
            raise fail("too_many_images", param="messages", limit=limit)
        return self


# POST /v1/chat/completions. Other OpenAI fields are accepted and ignored.
ChatRequest = create_model(
    "ChatRequest", __base__=ChatBase,
    model=(Any, Field(None, description="不检查：这个服务只有一个模型")),
    n=(Annotated[Any, OnlyOne()], None),
    stream_options=(Union[StreamOptions, None], None),
    **sampling("max_tokens"), max_completion_tokens=(ANSWER_LENGTH, None),
    messages=(Annotated[list[Message], Field(min_length=1)], ...))


def parse(model: type[BaseModel], body: dict, limits: dict, form=False):
    """The body as `model`, or the ApiError for its first mistake (an unknown field first)."""
    try:
        return model.model_validate(body, context={**limits, "form": form})
    except ValidationError as e:
        first = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]
        raise from_validation(first, PART_TAGS, model.model_fields) from None


def turns(messages: list[Message]) -> list[dict]:
    """The messages as the training template's turns, with an <image> marker where each image
    stood; system text goes in front of the first user turn."""
    system = [m.text() for m in messages if m.role == "system"]
    out = [{"role": m.role, "content": m.text()} for m in messages if m.role != "system"]
    if system:
        first = next(t for t in out if t["role"] == "user")
        first["content"] = "\n".join(system) + "\n" + first["content"]
    return out


def image_refs(messages: list[Message]) -> list[tuple[str, str]]:
    """(url, the parameter that sent it) for each image part, in order."""
    return [(p.image_url.url, f"messages[{i}].content[{j}].image_url") for i, m in enumerate(messages)
            for j, p in enumerate(m.content) if p.type == "image_url"]


# ----------------------------------------------------------------------------- answers

class Answer(BaseModel):
    """An answer always has all its fields: its schema says so."""
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Generation(Answer):
    id: str
    object: Literal["generation"] = "generation"
    model: str
    text: str
    finish_reason: str
    usage: Usage
    timings: dict


class ChatMessageOut(Answer):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(Answer):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Health(Answer):
    status: Literal["ok"]


class ErrorDetail(Answer):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(Answer):
    error: ErrorDetail


# Each server-sent event; its data is a JSON object or [DONE].
STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}


def schema_of(model: type[BaseModel], limits: dict | None = None, form=False, mode="validation") -> dict:
    """The model's JSON schema, whole (without $defs, as /openapi.json carries it), with the
    run-time bounds filled in from `limits`; a form's fields are never null. An answer's
    schema (mode="serialization") lists every field it always has as required."""
    schema = model.model_json_schema(mode=mode)
    defs, limits = schema.pop("$defs", {}), limits or {}

    def fill(node):
        if isinstance(node, list):
            return [fill(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return fill(defs[node["$ref"].rsplit("/", 1)[1]])
        out = {k: fill(v) for k, v in node.items() if k not in ("title", "default") and not k.startswith("x-limit")}
        if limits.get(node.get("x-limit")) is not None:
            out["maximum"] = limits[node["x-limit"]]
        if limits.get(node.get("x-limit-chars")) is not None:
            out["maxLength"] = limits[node["x-limit-chars"]]
        if form and isinstance(out.get("type"), list):
            out["type"] = out["type"][0]
        return out
    return fill(schema)


def api_docs(body: dict | None = None, ok: type[BaseModel] | None = None, errors=(400, 408, 413, 415, 503)) -> dict:
    """Keyword arguments for a route: its request body (content type -> schema), its 200 answer
    (as JSON, and as server-sent events when it has a body) and its error answers."""
    error = {"application/json": {"schema": schema_of(ErrorResponse, mode="serialization")}}
    responses = {code: {"description": "错误", "content": error} for code in errors}
    if ok is not None:
        responses[200] = {"description": "成功", "content": {"application/json": {"schema": schema_of(ok, mode="serialization")},
                                                            **(STREAM if body else {})}}
    extra = {"openapi_extra": {"requestBody": {"required": True, "content": body}}} if body else {}
    return {"responses": responses, **extra}
