"""Data-path attacks on a local training folder: captions.json entries that escape the folder,
symlinks that leave it, and files that are not the image their extension claims. Each is
skipped with its name and reason (or stops the run when too many are bad); none is read."""
import io
import json
import os

import pytest
from PIL import Image

import images
from captions import CaptionSet, check_images
from folders import load_local
from images import decode as decode_image
from errors import UserError


def png(color=(200, 30, 30), size=(24, 24), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(/tmp/pwned) (w) file closefile\nshowpage\n"
ESCAPES = {   # captions.json key -> why it is refused
    "../secret.png": "数据文件夹之外",
    "images/../../secret.png": "数据文件夹之外",
    "/etc/hostname": "数据文件夹之外",
    "C:\\Windows\\win.ini": "数据文件夹之外",
    "link_out.png": "数据文件夹之外",             # symlink to a real image outside the folder
    "linked_dir/secret.png": "数据文件夹之外",     # a symlinked folder that leaves it
    "link_etc.png": "数据文件夹之外",              # symlink to /etc/hostname
    "nul\x00.png": "数据文件夹之外",
}
IMPOSTORS = {  # file name -> (bytes, reason)
    "page.jpg": (b"<!doctype html><html><script>alert(1)</script></html>", "不是可识别的图片"),
    "script.png": (b"#!/bin/sh\nrm -rf ~\n", "不是可识别的图片"),
    "archive.webp": (b"PK\x03\x04" + b"\0" * 200, "不是可识别的图片"),
    "program.jpeg": (b"\x7fELF\x02\x01\x01" + b"\0" * 200, "不是可识别的图片"),
    "postscript.jpg": (EPS, "不是可识别的图片"),          # never handed to Ghostscript
    "icon.png": (png(fmt="ICO"), "不是可识别的图片"),         # a real image, but not a format we decode
    "empty.jpg": (b"", "0 字节"),
}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    images = root / "images"
    images.mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(png((4, 5, 6)))
    os.symlink(tmp_path / "secret.png", images / "link_out.png")
    os.symlink(tmp_path / "outside", images / "linked_dir")
    os.symlink("/etc/hostname", images / "link_etc.png")
    good = {"good.png": png(), "really_png.jpg": png((0, 0, 255))}        # content decides, not the name
    for name, data in {**good, **{k: v[0] for k, v in IMPOSTORS.items()}}.items():
        (images / name).write_bytes(data)
    os.symlink(images / "good.png", images / "link_in.png")                # a link that stays inside: fine
    entries = {name: f"描述 {i}" for i, name in enumerate([*good, "link_in.png", *IMPOSTORS, *ESCAPES])}
    (root / "captions.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return root


def test_escapes_symlinks_and_impostors_are_skipped_and_named(folder, capsys):
    rows = load_local(str(folder))
    data = CaptionSet(rows, 16)
    kept = check_images(data, max_bad_ratio=0.9)
    used = sorted(rows.names[i] for i in kept.images)
    assert used == ["good.png", "link_in.png", "really_png.jpg"]
    reasons = dict(kept.bad)
    for name, why in {**ESCAPES, **{k: v[1] for k, v in IMPOSTORS.items()}}.items():
        assert why in reasons[name], (name, reasons.get(name))
    err = capsys.readouterr().err
    assert f"跳过 {len(ESCAPES) + len(IMPOSTORS)}/{len(ESCAPES) + len(IMPOSTORS) + 3} 张" in err
    for i in range(len(kept)):                                        # only the three good files are ever read
        item = kept[(0, i)]
        assert item["image"].getpixel((0, 0)) not in ((1, 2, 3), (4, 5, 6))
    assert not os.path.exists("/tmp/pwned")


def test_too_many_bad_entries_stop_before_training_with_the_names(folder):
    data = CaptionSet(load_local(str(folder)), 16)
    with pytest.raises(UserError) as e:
        check_images(data, max_bad_ratio=0.05)
    msg = str(e.value)
    assert "训练未开始" in msg and "--max-bad-ratio" in msg and "../secret.png（路径指向数据文件夹之外，已拒绝）" in msg


def test_postscript_is_never_decoded_even_if_pillow_could(monkeypatch):
    """EPS files are handed to Ghostscript by Pillow: make sure that code path is never reached."""
    from PIL import EpsImagePlugin
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(1))
    with pytest.raises(images.BadImage, match="不是可识别的图片"):
        decode_image(EPS, 16)
    assert not ran
