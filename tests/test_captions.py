"""Local folders: decoding every kind of image the issue names, bad files skipped with their
reasons, refused paths, caption formats and their error messages, per-epoch caption choice."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captions
import sources
from captions import CaptionSet, Mixture, check_images
from folders import load_local
from images import BadImage, ImagePolicy, decode as decode_image
from errors import UserError


def photo(size=(48, 36), seed=0, mode="RGB") -> Image.Image:
    """A noisy gradient, so JPEG sizes and decoding costs are photo-like."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1).mean(-1, keepdims=True)
    a = np.clip(base + rng.normal(0, 30, (h, w, 3)) + rng.integers(0, 120, 3), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def encode(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, EXIF orientation 6 (display rotated 90 degrees): shows 20 x 40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo((40, 20)), "JPEG", exif=exif)


def sixteen_bit_png() -> bytes:
    a = np.full((16, 16), 32896, dtype=np.uint16)            # 128 * 257: mid grey in 16 bits
    return encode(Image.fromarray(a), "PNG")


def gif_two_frames() -> bytes:
    frames = [Image.new("P", (20, 20), 1), Image.new("P", (20, 20), 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 250, 0, 0, 0, 0, 250] + [0] * 759)
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    return b.getvalue()


GOOD = {                                            # file -> bytes; each one must decode
    "dog.jpg": lambda: encode(photo(seed=1)),
    "cat.png": lambda: encode(photo(seed=2), "PNG"),
    "bird.webp": lambda: encode(photo(seed=3), "WEBP"),
    "boat.bmp": lambda: encode(photo(seed=4), "BMP"),
    "anim.gif": gif_two_frames,
    "rotated.jpg": exif_rotated_jpeg,
    "rgba.png": lambda: encode(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), "PNG"),
    "gray.png": lambda: encode(photo(seed=5, mode="L"), "PNG"),
    "deep.png": sixteen_bit_png,
    "cmyk.jpg": lambda: encode(photo(seed=6).convert("CMYK")),
    "小猫.jpg": lambda: encode(photo(seed=7)),
    "multi.jpg": lambda: encode(photo(seed=8)),
}
BAD = {                                             # file -> (bytes or None = missing, reason)
    "corrupt.jpg": (b"\xff\xd8 this is not really a jpeg" * 10, "不是可识别的图片"),
    "truncated.jpg": (encode(photo((128, 128), seed=9))[:3000], "截断"),
    "empty.png": (b"", "0 字节"),
    "missing.jpg": (None, "文件不存在"),
    "../outside.jpg": (None, "数据文件夹之外"),
    "/etc/hostname": (None, "数据文件夹之外"),
}


def make_local_folder(root: Path, layout: str = "captions.json") -> Path:
    """images/ + captions.json (or metadata.jsonl) with every good and bad case above."""
    images = root / "images"
    images.mkdir(parents=True)
    caps = {}
    for name, make in GOOD.items():
        (images / name).write_bytes(make())
        caps[name] = f"一张名为{Path(name).stem}的图片"
    caps["multi.jpg"] = ["第一条描述", "第二条描述", "第三条描述"]
    for name, (data, _) in BAD.items():
        if data is not None:
            (images / name).write_bytes(data)
        caps[name] = "坏图片"
    (root / "outside.jpg").write_bytes(encode(photo()))   # exists, but outside images/: still refused
    (images / "blank.jpg").write_bytes(encode(photo()))
    caps["blank.jpg"] = "   "                               # empty caption: skipped
    if layout == "captions.json":
        (root / "captions.json").write_text(json.dumps(caps, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name, c in caps.items():
                rel = name if name.startswith("/") or name.startswith("..") else f"images/{name}"
                f.write(json.dumps({"file_name": rel, "text": c}, ensure_ascii=False) + "\n")
    return root


# ----------------------------------------------------------------------------- decoding

def test_every_format_decodes_to_rgb_of_the_right_size_and_orientation(tmp_path):
    for name, make in GOOD.items():
        im = decode_image(make(), None)
        assert im.mode == "RGB", name
    assert decode_image(exif_rotated_jpeg()).size == (20, 40)            # EXIF applied
    assert decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 255, 255)), "PNG")).getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(sixteen_bit_png()).getpixel((3, 3)) == (128, 128, 128)   # scaled, not clipped to white
    assert decode_image(gif_two_frames()).getpixel((0, 0)) == (250, 0, 0)        # first frame
    assert decode_image(encode(photo(seed=5, mode="L"), "PNG"), 16).size == (16, 16)
    p = tmp_path / "中文名字.png"
    p.write_bytes(encode(photo(), "PNG"))
    assert decode_image(str(p), 32).size == (32, 32)


def test_jpeg_draft_decoding_matches_full_decoding_closely():
    data = encode(photo((512, 384), seed=11), quality=90)
    fast = np.asarray(decode_image(data, 64), dtype=np.float32)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BICUBIC, reducing_gap=3.0),
                      dtype=np.float32)
    assert np.abs(fast - full).mean() < 6


@pytest.mark.parametrize("data, reason", [(v[0], v[1]) for v in BAD.values() if v[0] is not None])
def test_bad_bytes_raise_badimage_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, 32)


def test_too_many_pixels_refused_from_the_header_without_decoding():
    big = encode(Image.new("L", (3000, 2000)), "PNG")
    truncated = big[:len(big) // 2]                         # decoding it would fail as "truncated"
    with pytest.raises(BadImage, match="像素"):
        decode_image(truncated, 32, ImagePolicy(1_000_000))
    assert decode_image(big, 32, ImagePolicy(10_000_000)).size == (32, 32)


# ----------------------------------------------------------------------------- local folders

@pytest.mark.parametrize("layout", ["captions.json", "metadata.jsonl"])
def test_local_folder_uses_good_images_and_names_the_bad_ones(tmp_path, layout, capsys):
    root = make_local_folder(tmp_path / "data", layout)
    rows = load_local(str(root))
    assert rows.empty_captions == 1
    data = CaptionSet(rows, 32)
    with pytest.raises(UserError, match=r"6/18 张图片无法使用.*--max-bad-ratio"):
        check_images(data, max_bad_ratio=0.05)
    good = check_images(data, max_bad_ratio=0.5)
    err = capsys.readouterr().err
    used = sorted(rows.names[i] for i in good.images)
    assert used == sorted(n if layout == "captions.json" else f"images/{n}" for n in GOOD)
    assert "跳过 6/18 张" in err and "1 张图片没有非空描述" in err
    reasons = dict(good.bad)
    for name, (_, reason) in BAD.items():
        name = name if layout == "captions.json" or name.startswith(("/", "..")) else f"images/{name}"
        assert reason in reasons[name], (name, reasons)
    assert sum(f"{n}（{r}）" in err for n, r in good.bad) == 5 and "等" in err      # the first five named
    item = good[(0, 0)]
    assert item["image"].size == (32, 32) and item["messages"][0]["role"] == "user"
    assert item["messages"][1]["content"]


def test_one_caption_per_image_per_epoch_or_all_captions(tmp_path):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(encode(photo()))
    (root / "captions.json").write_text(json.dumps({"a.jpg": ["c0", "c1", "c2", "c3", "c4"]}), encoding="utf-8")
    data = CaptionSet(load_local(str(root)), 16, seed=0)
    assert len(data) == 1
    seen = {data[(e, 0)]["messages"][1]["content"] for e in range(30)}
    assert seen == {"c0", "c1", "c2", "c3", "c4"}
    assert data[(3, 0)]["messages"] == data[(3, 0)]["messages"]             # same key, same sample
    prompts = {data[(e, 0)]["messages"][0]["content"] for e in range(30)}
    assert "描述这张图片" in prompts | set(captions.PROMPTS) and len(prompts) >= 4
    assert any("图" in p for p in prompts) and any("image" in p for p in prompts)
    every = CaptionSet(load_local(str(root)), 16, all_captions=True)
    assert len(every) == 5 and [every[(0, k)]["messages"][1]["content"] for k in range(5)] == [f"c{i}" for i in range(5)]


def test_runtime_failure_is_replaced_by_the_next_image_not_fatal(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    for n in ("a.jpg", "b.jpg"):
        (root / "images" / n).write_bytes(encode(photo()))
    (root / "captions.json").write_text(json.dumps({"a.jpg": "A", "b.jpg": "B"}), encoding="utf-8")
    data = check_images(CaptionSet(load_local(str(root)), 16), 0.05)
    (root / "images" / "a.jpg").write_bytes(b"broken after the check")
    assert data[(0, 0)]["messages"][1]["content"] == "B"
    assert data.runtime_bad == 1 and "a.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("content, needle", [
    (b'{"a.jpg": "ok",\n "b.jpg": oops}', "第 2 行第 11 列"),
    ('{"a.jpg": "描述"}'.encode("gbk"), "不是 UTF-8"),
    (b'["just", "strings"]', "格式应为"),
])
def test_malformed_captions_json_names_the_position(tmp_path, content, needle):
    root = tmp_path / "d"
    root.mkdir()
    (root / "captions.json").write_bytes(content)
    with pytest.raises(UserError, match=needle):
        load_local(str(root))


def test_malformed_metadata_jsonl_names_the_line_and_missing_folder_is_clear(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\n{"file_name": "b.jpg", "text": \n',
                                         encoding="utf-8")
    with pytest.raises(UserError, match="第 2 行"):
        load_local(str(root))
    with pytest.raises(UserError, match="找不到本地数据文件夹"):
        load_local(str(tmp_path / "nope"))
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="captions.json"):
        load_local(str(tmp_path / "e"))


def test_metadata_csv_with_caption_columns_grouped(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "x.png").write_bytes(encode(photo(), "PNG"))
    (root / "metadata.csv").write_text("file_name,caption_0,caption_1\nx.png,first,second\n", encoding="utf-8")
    rows = load_local(str(root))
    assert rows.captions == [["first", "second"]]


def test_mixture_weights_set_items_per_epoch_and_cover_everything(tmp_path):
    def folder(name, n):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        for i in range(n):
            (root / "images" / f"{i}.png").write_bytes(encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"))
        (root / "captions.json").write_text(json.dumps({f"{i}.png": f"{name} {i}" for i in range(n)}), encoding="utf-8")
        return CaptionSet(load_local(str(root)), 8)
    a, b = folder("a", 10), folder("b", 4)
    mix = Mixture([a, b], [0.5, 2.0], seed=0)
    assert len(mix) == 5 + 8
    caps = [mix[(0, i)]["messages"][1]["content"] for i in range(len(mix))]
    assert sum(c.startswith("a ") for c in caps) == 5 and len(set(c for c in caps if c.startswith("a "))) == 5
    assert sorted(c for c in caps if c.startswith("b ")) == sorted([f"b {i}" for i in range(4)] * 2)
    seen = {mix[(e, i)]["messages"][1]["content"] for e in range(4) for i in range(5)}
    assert len(seen) >= 9                                 # a different half of a each epoch
    assert sources.parse_source("data/x:2") == ("data/x", 2.0) and sources.parse_source("owner/name") == ("owner/name", 1.0)
    with pytest.raises(UserError, match="权重"):
        sources.parse_source("data/x:0")


def test_holdout_is_fixed_and_small():
    train, val = sources.holdout(100, 0.05, 0)
    assert len(val) == 5 and not set(train) & set(val) and sources.holdout(100, 0.05, 0) == (train, val)
    assert sources.holdout(5, 0.05, 0) == ([0, 1, 2, 3, 4], [])
    assert len(sources.holdout(12, 0.05, 0)[1]) == 1


def test_image_refs_say_where_an_image_is_or_why_it_was_refused(tmp_path):
    root = make_local_folder(tmp_path / "d")
    source = sources.read("local", str(root), sources.Options())
    refs = dict(zip(source.train.names, source.train.refs))
    assert refs["dog.jpg"].path == str(root / "images" / "dog.jpg") and refs["dog.jpg"].refused is None
    assert refs["../outside.jpg"].path is None and "数据文件夹之外" in refs["../outside.jpg"].refused
    assert source.texts() == source.train.texts() and "第二条描述" in source.texts()
