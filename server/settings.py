"""The server's settings: every flag has an environment variable; flags win over the environment,
which wins over the defaults."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import images
from errors import ArgumentParser, UserError

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
    ("max_images", "SERVE_MAX_IMAGES", int, 4, "每个请求最多可带的图片数（每张图占模型的若干个提示词 token）"),
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
    max_images: int
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

    @property
    def limits(self) -> dict:
        """The bounds a request is checked against (protocol.py names them)."""
        return {"max_new_tokens": self.max_new_tokens, "max_prompt_chars": self.max_prompt_chars,
                "max_images": self.max_images}

    def validate(self):
        if self.dtype not in DTYPES:
            raise UserError(f"不支持的精度 {self.dtype!r}，可用：{', '.join(DTYPES)}。")
        for key in ("port", "max_batch", "max_image_pixels", "max_images", "max_prompt_chars", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} 必须是正整数（现在是 {getattr(self, key)}）。")
        if self.max_queue < 0 or self.threads < 0:
            raise UserError("max_queue 和 threads 不能为负数。")
        if not 0 < self.request_timeout < math.inf or not 0 < self.max_upload_mb < math.inf:
            raise UserError("request_timeout 和 max_upload_mb 必须是大于 0 的有限数字"
                            f"（现在是 {self.request_timeout} 和 {self.max_upload_mb}）。")
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


