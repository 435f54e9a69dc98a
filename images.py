"""The one image path, shared by training, evaluation and serving.

    bytes | path
      -> open: format and pixel count checked from the header        (ImagePolicy)
      -> decode: JPEG draft at 1/2..1/8 scale when that still covers the target size,
         EXIF orientation, first frame of animations / MPO
      -> RGB: palette and alpha composited on white, 16-bit scaled, CMYK converted
      -> resize to the encoder's square input (aspect ratio not kept)
      -> uint8 tensor (3, size, size): a quarter of float32's bytes on the way to the device
      -> normalise(): on the model's device, scaled and normalised with the encoder's mean/std;
         VLM.embed calls it, so training, evaluation and serving normalise in that one place
A model sees the same pixels for the same file whichever side decodes it: serving may refuse
what it must (file size, pixel count) but never decodes differently.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000        # width x height, refused from the header before any decoding
# Formats decoded at all. Others are "not an image" whatever the extension says: PIL's EPS reader
# would hand the file to Ghostscript, and rare formats are rarely audited parsers.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")         # JPEG covers MPO (camera) files


@dataclass(frozen=True)
class ImagePolicy:
    """What a caller accepts. Decoding itself is the same for every policy."""
    max_pixels: int = MAX_PIXELS
    formats: tuple[str, ...] = FORMATS
    max_bytes: int | None = None       # the decode's memory estimate (after a JPEG draft), checked first
    max_scans: int | None = None       # a progressive JPEG's scans: each one is another pass over all pixels


class BadImage(Exception):
    """An image that cannot be used. str(e) is a short Chinese reason; `code` says which rule
    refused it (missing, empty, unreadable, pixels, broken, memory, scans) and `info` its figures."""

    def __init__(self, reason: str, code: str = "unreadable", **info):
        super().__init__(reason)
        self.code, self.info = code, info


def open_image(src, policy: ImagePolicy) -> Image.Image:
    """Open (header only) and check format and pixel count. The caller closes the image."""
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, formats=policy.formats)
    except FileNotFoundError:
        raise BadImage("文件不存在", "missing") from None
    except Image.DecompressionBombError:
        raise BadImage("像素数超过上限", "pixels", size="?", limit=policy.max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        empty = size_of(src) == 0
        raise BadImage("空文件（0 字节）" if empty else "不是可识别的图片", "empty" if empty else "unreadable") from None
    w, h = im.size
    if w * h > policy.max_pixels:
        im.close()
        raise BadImage(f"{w}×{h} 像素，超过上限 {policy.max_pixels}", "pixels", size=f"{w}×{h}", limit=policy.max_pixels)
    return im


def decode(src, size: int | None = None, policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """bytes or a path -> RGB image, resized to size x size if a size is given."""
    with open_image(src, policy) as im, broken_is_bad():
        prepare(im, src, size, policy)
        im.load()
        out = to_rgb(ImageOps.exif_transpose(im))
    return resize(out, size) if size else out


def check(src, size: int | None = None, policy: ImagePolicy = ImagePolicy()):
    """What decode() refuses before decoding a pixel (format, pixel count, memory, JPEG scans),
    without decoding one: a cheap first look."""
    with open_image(src, policy) as im, broken_is_bad():
        prepare(im, src, size, policy)


@contextlib.contextmanager
def broken_is_bad():
    try:
        yield
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        raise BadImage("文件已损坏或被截断", "broken") from None


def prepare(im: Image.Image, src, size: int | None, policy: ImagePolicy):
    """A JPEG draft at the smallest scale that still covers size, then the policy's cost checks."""
    if size and im.format == "JPEG":
        im.draft("RGB", (size, size))
    check_cost(im, src, policy)


BAND_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_bytes(im: Image.Image) -> int:
    """Memory a decode needs at its peak, from the header alone (measured for 6324x6324 PNGs:
    5.7 bytes a pixel for grey, 11.4 for RGB, 16.2 for RGBA; the decoded image, its copies on the
    way to RGB, the resize)."""
    w, h = im.size
    return w * h * (3 * len(im.getbands()) * BAND_BYTES.get(im.mode, 1) + 4)


def check_cost(im: Image.Image, src, policy: ImagePolicy):
    """Refuse, before any pixel is decoded, what the policy finds too costly: memory from the
    header, and JPEG scans (0xFFDA markers: byte stuffing keeps them out of the coded data)."""
    if policy.max_bytes and (need := decode_bytes(im)) > policy.max_bytes:
        raise BadImage(f"解码需要约 {need >> 20} MB 内存", "memory", need_mb=need >> 20, limit_mb=policy.max_bytes >> 20)
    if policy.max_scans and im.format == "JPEG":
        data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
        if (scans := data.count(b"\xff\xda")) > policy.max_scans:
            raise BadImage(f"JPEG 有 {scans} 次扫描", "scans", scans=scans, limit=policy.max_scans)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":             # 16/32-bit grayscale: scale, don't clip
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def resize(img: Image.Image, size: int) -> Image.Image:
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)


def to_tensor(img: Image.Image, cfg) -> torch.Tensor:
    """RGB image -> (3, S, S) uint8 tensor at the encoder's size. `cfg` declares vit_image_size
    (a VLMConfig); normalise() makes the encoder's input of it, on the device."""
    size = cfg.vit_image_size
    img = resize(img if img.mode == "RGB" else img.convert("RGB"), size)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def pixels(src, cfg, policy: ImagePolicy = ImagePolicy()) -> torch.Tensor:
    """bytes or a path -> the uint8 tensor the model receives (what serving calls)."""
    return to_tensor(decode(src, cfg.vit_image_size, policy), cfg)


def normalise(pixels: torch.Tensor, cfg) -> torch.Tensor:
    """uint8 (n, 3, S, S) pixels -> the vision encoder's float32 input on their device: scaled to
    [0, 1], then normalised with cfg's vit_image_mean and vit_image_std. Float pixels are taken as
    normalised already (benchmarks and tests that make their own)."""
    if pixels.is_floating_point():
        return pixels
    x = pixels.float().div_(255)
    for c, (m, s) in enumerate(zip(cfg.vit_image_mean, cfg.vit_image_std)):
        x[:, c].sub_(m).div_(s)           # plain numbers: no mean/std tensor to copy to the device each step
    return x


def size_of(src) -> int | None:
    if isinstance(src, (bytes, bytearray)):
        return len(src)
    try:
        return os.path.getsize(src)
    except OSError:
        return None
