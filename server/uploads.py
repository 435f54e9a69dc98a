"""The images a request sends -> the model's pixels: data: URLs, base64, (when enabled) http(s)
downloads and uploaded files, decoded by images.py exactly as training decodes them."""
from __future__ import annotations

import base64
import binascii
import contextlib

import torch

import images
from server import remote
from server.errors import ApiError
from server.settings import Settings


DECODE_BYTES = 2 ** 29       # one decode's peak memory estimate (images.decode_bytes): 512 MB
REMOTE = ("http://", "https://")
JPEG_SCANS = 64              # encoders write ~10 for a progressive JPEG; 400 tiny ones took 35 s to decode


def image_pixels(data: bytes, settings: Settings, cfg, param: str) -> torch.Tensor:
    """Bytes -> the model's pixel tensor, through the same path as training (images.py). The file
    size and the header (pixel count, memory, JPEG scans) are checked before any pixel is decoded;
    anything wrong with the file is a 400/413, never a 500."""
    with refusals(data, settings, param) as policy:
        return images.pixels(data, cfg, policy)


def check_header(data: bytes, settings: Settings, cfg, param: str):
    """image_pixels' refusals from the file size and header alone: cheap, no pixel decoded."""
    with refusals(data, settings, param) as policy:
        images.check(data, cfg.vit_image_size, policy)


@contextlib.contextmanager
def refusals(data: bytes, settings: Settings, param: str):
    """The serving policy for one file; its refusals as our 4xx errors."""
    if len(data) > settings.max_upload:
        raise ApiError(413, "image_too_large", param, limit_mb=settings.max_upload_mb)
    try:
        yield images.ImagePolicy(settings.max_image_pixels, max_bytes=DECODE_BYTES, max_scans=JPEG_SCANS)
    except images.BadImage as e:
        code = {"pixels": "image_pixels", "broken": "image_broken", "memory": "image_memory",
                "scans": "image_scans"}.get(e.code, "image_unreadable")
        raise ApiError(400, code, param, **e.info) from None


def first_look(items: list[tuple[bytes | str, str]], settings: Settings, cfg) -> list[tuple[bytes | str, str]]:
    """Each image's bytes, refused now if its size or header says so: cheap work that needs no
    decode worker, so a file refused from its header never waits for one. Remote references
    stay references: decoded() fetches (and checks) them in the decode pool."""
    out = []
    for src, param in items:
        if isinstance(src, str) and settings.allow_remote_images and src.startswith(REMOTE):
            out.append((src, param))
            continue
        data = src if isinstance(src, bytes) else image_bytes(src, settings, param)
        check_header(data, settings, cfg, param)
        out.append((data, param))
    return out


def image_bytes(ref: str, settings: Settings, param: str) -> bytes:
    """A data: URL, plain base64, or (only when enabled) an http(s) URL -> the file's bytes."""
    if ref.startswith(REMOTE):
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


def decoded(items: list[tuple[bytes | str, str]], settings: Settings, cfg):
    """(file bytes or an image reference, the parameter that sent it) for each image -> each
    image's (3, H, W) pixels in turn, every reference read first. Runs in a worker thread."""
    files = [(src if isinstance(src, bytes) else image_bytes(src, settings, param), param) for src, param in items]
    for data, param in files:
        yield image_pixels(data, settings, cfg, param)
