"""One image path: odd files give the model the same pixel tensors through the training data
path (local folder -> data set -> collator) and through the HTTP path of a running server."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import captions
import folders
from checkpoint import save_checkpoint
from collate import Collator
from images import BadImage, ImagePolicy, decode, normalise
from model import VLM
from tests.conftest import tiny_config
from tests.serve_helpers import ROOT, free_port, stop, wait_http

# serve.main() with the vision encoder's input recorded: the tensor the model really receives.
RECORDING = """
import pathlib, sys, torch, model, serve
out = pathlib.Path(sys.argv.pop(1))
real = model.VisionEncoder.forward
def recording(self, pixels):
    torch.save(pixels.detach().clone(), out / f"{len(list(out.iterdir()))}.pt")
    return real(self, pixels)
model.VisionEncoder.forward = recording
serve.main(sys.argv[1:])
"""


def photo(w, h, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1).mean(-1, keepdims=True)
    a = np.clip(base + rng.normal(0, 30, (h, w, 3)) + rng.integers(0, 120, 3), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def encode(im, fmt, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def transparent(mode) -> Image.Image:
    im = photo(40, 30).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, :20, 3] = 0                                  # left half invisible (its RGB is the noise)
    a[:, 20:, 3] = 128
    return Image.fromarray(a, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(a, "RGBA")


def palette_trns() -> bytes:
    im = photo(30, 30).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(im, "PNG", transparency=3)


def png16_rgb(w=24, h=20) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    a = (np.asarray(photo(w, h)).astype(np.uint16) * 257 + 77).astype(">u2")
    raw = b"".join(b"\0" + a[y].tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(40, 20), "JPEG", exif=exif)


def animated(fmt) -> bytes:
    a, b = photo(20, 20, seed=1), photo(20, 20, seed=2)
    return encode(a, fmt, save_all=True, append_images=[b], duration=100, loop=0)


ODD = {
    "rgba.png": lambda: encode(transparent("RGBA"), "PNG"),
    "la.png": lambda: encode(transparent("LA"), "PNG"),
    "palette-trns.png": palette_trns,
    "alpha.webp": lambda: encode(transparent("RGBA"), "WEBP", lossless=True),
    "grey16.png": lambda: encode(Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)), "PNG"),
    "rgb16.png": png16_rgb,
    "cmyk.jpg": lambda: encode(photo(30, 20, "CMYK"), "JPEG"),
    "exif-rotated.jpg": exif_rotated,
    "large.jpg": lambda: encode(photo(2000, 1500), "JPEG", quality=90),
    "animated.gif": lambda: animated("GIF"),
    "animated.webp": lambda: animated("WEBP"),
    "camera.mpo": lambda: animated("MPO"),
    "one-pixel.png": lambda: encode(photo(1, 1), "PNG"),
    "one-by-2000.png": lambda: encode(photo(1, 2000), "PNG"),
}


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    (d / "images").mkdir()
    for name, make in ODD.items():
        (d / "images" / name).write_bytes(make())
    (d / "captions.json").write_text(json.dumps({name: "一张图" for name in ODD}, ensure_ascii=False))
    return d


def test_the_corpus_is_as_odd_as_it_claims(odd_files):
    """Guards the test itself: each file really has the property it is named for."""
    opened = {n: Image.open(odd_files / "images" / n) for n in ODD}
    assert opened["rgba.png"].mode == "RGBA" and opened["la.png"].mode == "LA"
    assert opened["palette-trns.png"].mode == "P" and "transparency" in opened["palette-trns.png"].info
    assert opened["alpha.webp"].mode == "RGBA" and opened["cmyk.jpg"].mode == "CMYK"
    assert opened["grey16.png"].mode.startswith("I")
    assert (odd_files / "images" / "rgb16.png").read_bytes()[24] == 16 and opened["rgb16.png"].size == (24, 20)
    assert opened["animated.gif"].n_frames == 2 and opened["animated.webp"].n_frames == 2
    assert opened["camera.mpo"].format == "MPO" and opened["camera.mpo"].n_frames == 2
    assert opened["exif-rotated.jpg"].getexif()[0x0112] == 6 and opened["large.jpg"].size == (2000, 1500)
    assert opened["one-by-2000.png"].size == (1, 2000)
    # transparency is composited on white: the invisible half is white, not the hidden noise
    assert decode(odd_files / "images" / "rgba.png").getpixel((5, 5)) == (255, 255, 255)
    assert decode(odd_files / "images" / "palette-trns.png").mode == "RGB"


def test_a_16_bit_png_is_scaled_not_clipped(odd_files):
    grey = np.asarray(decode(odd_files / "images" / "grey16.png"))
    assert grey.min() < 10 and 200 < grey.max() < 255            # 0..59900 -> 0..233, not all white


def test_the_pixel_cap_is_one_policy(odd_files):
    with pytest.raises(BadImage) as e:
        decode(odd_files / "images" / "large.jpg", 32, ImagePolicy(max_pixels=1_000_000))
    assert e.value.code == "pixels" and "2000×1500" in str(e.value)


def test_training_and_serving_give_the_model_identical_pixels(odd_files, tok, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tok, vit_image_size=32, lm_max_len=512)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, VLM(cfg), tok, {"lang": "zh"})

    rows = folders.load_local(str(odd_files))
    data = captions.CaptionSet(rows, cfg.vit_image_size)
    collate = Collator(tok, cfg)
    trained = {}
    for k in range(len(data)):
        name = rows.names[data.index[k][0]]
        trained[name] = normalise(collate([data[(0, k)]])["pixels"], cfg)[0]     # what the encoder gets
    assert sorted(trained) == sorted(ODD)                  # every odd file is usable for training

    rec, port = tmp_path / "rec", free_port()
    rec.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORDING, str(rec), "--checkpoint", str(ckpt), "--host", "127.0.0.1",
         "--port", str(port), "--max-batch", "1", "--log-level", "warning"],
        cwd=ROOT, stdout=open(tmp_path / "log", "wb"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base, proc, tmp_path / "log", ready=True)
        for i, name in enumerate(ODD):
            r = httpx.post(base + "/v1/generate-multipart", timeout=60,
                           files={"image": (name, (odd_files / "images" / name).read_bytes(), "application/octet-stream")},
                           data={"prompt": "描述这张图片", "max_new_tokens": "1"})
            assert r.status_code == 200, (name, r.text)
            served = torch.load(rec / f"{i}.pt")
            assert served.shape == (1, 3, 32, 32), name
            assert torch.equal(served[0], trained[name]), f"{name}: serving decoded differently from training"
    finally:
        stop(proc)


def test_pixels_travel_as_uint8_and_the_model_normalises_them_once(tok):
    """The collator's pixels are the image's own bytes (a quarter of float32's); VLM.embed makes
    the encoder's input of them with the same float32 steps as the CPU collator took before."""
    torch.manual_seed(0)
    cfg = tiny_config(tok, vit_image_size=32, vit_image_mean=(0.48145466, 0.4578275, 0.40821073),
                      vit_image_std=(0.26862954, 0.26130258, 0.27577711))
    img = photo(40, 30)
    batch = Collator(tok, cfg, train=False)([{"image": img, "messages": [{"role": "user", "content": "hi"}]}])
    px = batch["pixels"]
    assert px.dtype == torch.uint8 and px.shape == (1, 3, 32, 32)
    assert torch.equal(px[0].permute(1, 2, 0), torch.from_numpy(np.array(img.resize((32, 32), Image.BICUBIC, reducing_gap=3.0))))
    before = (px[0].float().div_(255) - torch.tensor(cfg.vit_image_mean).view(3, 1, 1)) / torch.tensor(cfg.vit_image_std).view(3, 1, 1)
    assert torch.equal(normalise(px, cfg)[0], before)
    model = VLM(cfg).eval()
    with torch.no_grad():
        assert torch.equal(model.embed(batch["input_ids"], px), model.embed(batch["input_ids"], normalise(px, cfg)))
