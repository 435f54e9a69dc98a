"""The images a request sends -> the model's pixels: data: URLs, base64, (when enabled) http(s)
downloads and uploaded files, decoded by images.py exactly as training decodes them."""
from __future__ import annotations

import base64
import binascii

import torch

import images
from server import remote
from server.errors import ApiError
from server.settings import Settings


DECODE_BYTES = 2 ** 29       # one decode's peak memory estimate (images.decode_bytes): 512 MB
JPEG_SCANS = 64              # encoders write ~10 for a progressive JPEG; 400 tiny ones took 35 s to decode


def image_pixels(data: bytes, settings: Settings, cfg, param: str) -> torch.Tensor:
    """Bytes -> the model's pixel tensor, through the same path as training (images.py). The file
    size and the header (pixel count) are checked before any pixel is decoded; anything wrong
    with the file is a 400/413, never a 500."""
    if len(data) > settings.max_upload:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    policy = images.ImagePolicy(settings.max_image_pixels, max_bytes=DECODE_BYTES, max_scans=JPEG_SCANS)
    try:
        return images.pixels(data, cfg, policy)
    except images.BadImage as e:
        code = {"pixels": "image_pixels", "broken": "image_broken", "memory": "image_memory",
                "scans": "image_scans"}.get(e.code, "image_unreadable")
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
        data = remote.download(url, settings.max_upload)
    except remote.Refused:
        raise ApiError(400, "remote_failed", param) from None
    if len(data) > settings.max_upload:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    return data


def to_pixels(items: list[tuple[bytes | str, str]], settings: Settings, cfg) -> torch.Tensor | None:
    """(file bytes or an image reference, the parameter that sent it) for each image -> the
    stacked (n, 3, H, W) pixels, or None without images. Runs in a worker thread."""
    if not items:
        return None
    files = [(src if isinstance(src, bytes) else image_bytes(src, settings, param), param) for src, param in items]
    return torch.stack([image_pixels(data, settings, cfg, param) for data, param in files])
