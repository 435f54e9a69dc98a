"""Hugging Face data sets, built here (never downloaded): Flickr30k's exact schema as parquet and
as save_to_disk, caption_0..4 with real splits, `sentences` with `raw`, a webdataset shard, a
path column, URL-only data, the hub id path (parquet conversion) and offline behaviour."""
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict, Image as HFImage

import hub
import sources
from captions import CaptionSet, check_images
from hub import StreamCaptions, load_hf
from errors import UserError
from test_captions import encode, photo

ROOT = Path(__file__).resolve().parent.parent
CORRUPT = b"\xff\xd8\xff\xe0 definitely not a jpeg"


def flickr_table(n_train=8, n_val=3, n_test=2, corrupt_row=None) -> Dataset:
    """Flickr30k's columns and types: image (Image), caption (5 str), sentids (5 str), split,
    img_id, filename; one table whose `split` column holds train/val/test."""
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    rows = {"image": [], "caption": [], "sentids": [], "split": splits, "img_id": [], "filename": []}
    for i, s in enumerate(splits):
        data = CORRUPT if i == corrupt_row else encode(photo((60, 45), seed=i))
        rows["image"].append({"bytes": data, "path": f"{1000 + i}.jpg"})
        rows["caption"].append([f"A {s} photo number {i} view {k}." for k in range(5)])
        rows["sentids"].append([str(i * 5 + k) for k in range(5)])
        rows["img_id"].append(str(i))
        rows["filename"].append(f"{1000 + i}.jpg")
    return Dataset.from_dict(rows).cast_column("image", HFImage())


def flickr_parquet(root: Path, **kw) -> Path:
    """As the hub's parquet conversion lays it out: one split named test."""
    root.mkdir(parents=True, exist_ok=True)
    flickr_table(**kw).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


def flickr_disk(root: Path, **kw) -> Path:
    DatasetDict({"test": flickr_table(**kw)}).save_to_disk(str(root))
    return root


def fake_hub(monkeypatch, copies: dict, calls: list):
    """datasets.load_dataset for hub ids is answered from local copies; everything else is real.
    Scripted ids refuse revision None exactly as datasets >= 4 does."""
    real = datasets.load_dataset

    def load_dataset(path, *args, revision=None, **kw):
        if path not in copies:
            return real(path, *args, revision=revision, **kw)
        calls.append((path, revision))
        local, scripted = copies[path]
        if scripted and revision != "refs/convert/parquet":
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")
        return real(str(local), *args, **kw)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_flickr30k_schema_filters_the_split_column(tmp_path, layout, capsys):
    make = flickr_parquet if layout == "parquet" else flickr_disk
    path = make(tmp_path / "flickr", corrupt_row=2)
    train, val = load_hf(str(path), "train")
    assert len(train.refs) == 8 and len(val.refs) == 3
    assert all(len(c) == 5 for c in train.captions) and "train photo number 0" in train.captions[0][0]
    assert all("val photo" in c[0] for c in val.captions)
    data = check_images(CaptionSet(train, 16), max_bad_ratio=0.2)
    assert len(data) == 7 and data.bad == [(f"{path}#2", "不是可识别的图片")]
    assert "按 split 列筛选" in capsys.readouterr().err
    test, _ = load_hf(str(path), "test")
    assert len(test.refs) == 2 and "test photo" in test.captions[0][0]
    with pytest.raises(UserError, match="split 列里没有 'dev'.*test, train, val"):
        load_hf(str(path), "dev")


def test_hub_id_uses_the_parquet_conversion_and_says_so(tmp_path, monkeypatch, capsys):
    calls = []
    fake_hub(monkeypatch, {"nlphuji/flickr30k": (flickr_parquet(tmp_path / "f"), True),
                           "someone/scripted": (flickr_parquet(tmp_path / "s"), True)}, calls)
    train, val = load_hf("nlphuji/flickr30k", "train")
    assert calls == [("nlphuji/flickr30k", "refs/convert/parquet")] and len(train.refs) == 8 and len(val.refs) == 3
    assert "Parquet 转换版本（revision=refs/convert/parquet）" in capsys.readouterr().err
    train, _ = load_hf("someone/scripted", "train")        # unknown script data set: retried, said
    assert calls[1:] == [("someone/scripted", None), ("someone/scripted", "refs/convert/parquet")]
    assert len(train.refs) == 8 and "脚本式数据集" in capsys.readouterr().err


def f8k_parquet(root: Path) -> Path:
    """jxie/flickr8k's layout: image + caption_0..caption_4, real train/validation/test splits."""
    root.mkdir(parents=True)
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        Dataset.from_dict({"image": [{"bytes": encode(photo(seed=i)), "path": None} for i in range(n)],
                           **{f"caption_{k}": [f"{split} {i} c{k}" for i in range(n)] for k in range(5)}}
                          ).cast_column("image", HFImage()).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


def test_caption_columns_grouped_and_real_validation_split(tmp_path):
    root = f8k_parquet(tmp_path / "f8k")
    train, val = load_hf(str(root), "train")
    assert train.captions[0] == [f"train 0 c{k}" for k in range(5)] and len(train.refs) == 6
    assert len(val.refs) == 2 and val.captions[1][4] == "validation 1 c4"
    only, _ = load_hf(str(root), "train", caption_column="caption_2")
    assert only.captions[3] == ["train 3 c2"]


def coco_copy(tmp_path) -> Path:
    """A local copy with a path column: three images inside its folder, one row escaping it."""
    root = tmp_path / "coco"
    (root / "imgs").mkdir(parents=True)
    for i in range(3):
        (root / "imgs" / f"{i}.jpg").write_bytes(encode(photo(seed=i)))
    (tmp_path / "secret.jpg").write_bytes(encode(photo()))
    Dataset.from_dict({"file_name": ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg", "../secret.jpg"],
                       "sentences": [[{"raw": f"Sentence {i} a.", "tokens": ["x"]}, {"raw": f"Sentence {i} b.", "tokens": []}]
                                     for i in range(4)],
                       "cocoid": [1, 2, 3, 4]}).to_parquet(str(root / "train.parquet"))
    return root / "train.parquet"


def test_sentences_with_raw_and_path_column_inside_the_folder(tmp_path, capsys):
    train, _ = load_hf(str(coco_copy(tmp_path)), "train")
    assert train.captions[1] == ["Sentence 1 a.", "Sentence 1 b."] and train.image_kind == "path"
    data = check_images(CaptionSet(train, 16), max_bad_ratio=0.5)
    assert len(data) == 3 and "数据文件夹之外" in data.bad[0][1]


def test_streamed_path_column_is_read_inside_the_copy_not_the_current_folder(tmp_path, monkeypatch, capsys):
    path = str(coco_copy(tmp_path))
    monkeypatch.chdir(tmp_path)                 # "imgs/0.jpg" is not here, "../secret.jpg" would be
    train, head = hub.load_stream(path, "train", None, None, 1000, 2)
    assert len(check_images(CaptionSet(head, 16), max_bad_ratio=0)) == 2
    s = StreamCaptions(train, path, length=4, image_size=16, buffer=0, max_bad_ratio=1.0)
    assert s[(0, 0)]["messages"][1]["content"].startswith("Sentence 2 ") and s.runtime_bad == 0
    s[(0, 1)]                                   # the escaping row is skipped, the stream starts over
    assert s.runtime_bad == 1 and "数据文件夹之外" in capsys.readouterr().err


def test_url_only_data_set_explains_how_to_fetch_images(tmp_path):
    path = tmp_path / "cc.parquet"
    Dataset.from_dict({"image_url": ["http://example.com/a.jpg"], "caption": ["a"]}).to_parquet(str(path))
    with pytest.raises(UserError, match="只有图片链接.*img2dataset.*webdataset"):
        load_hf(str(path), "train")


def webdataset_shard(path: Path, n=6, corrupt=(3,)):
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("jpg", CORRUPT if i in corrupt else encode(photo(seed=i))),
                              ("txt", f"shard caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shard(tmp_path):
    shard = webdataset_shard(tmp_path / "shard-000000.tar")
    train, _ = load_hf(str(shard), "train")
    data = check_images(CaptionSet(train, 16), max_bad_ratio=0.2)
    assert len(data) == 5 and [r[0] for r in data.bad] == [f"{shard}#3"]
    assert {data[(0, k)]["messages"][1]["content"] for k in range(5)} == {f"shard caption {i}" for i in (0, 1, 2, 4, 5)}


def test_streaming_takes_rows_in_order_of_a_shuffled_stream_and_skips_bad_ones(tmp_path, capsys):
    path = flickr_parquet(tmp_path / "f", n_train=10, n_val=0, n_test=0, corrupt_row=4)
    stream = hub.open_local_hf(str(path), streaming=True)
    train, _ = hub.pick_split(stream, str(path), "train")
    s = StreamCaptions(train, "f", length=20, image_size=16, buffer=4, max_bad_ratio=0.5)
    got = [int(s[(0, k)]["messages"][1]["content"].split()[4]) for k in range(9)]
    assert sorted(got) == [0, 1, 2, 3, 5, 6, 7, 8, 9] and got != sorted(got)      # each good row once, shuffled
    assert s.runtime_bad == 1 and "跳过 f 第" in capsys.readouterr().err
    again = int(s[(1, 0)]["messages"][1]["content"].split()[4])   # the stream ended: it starts over
    assert again in got and s.pass_no == 1 and len(s) == 20


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_id_gives_one_chinese_line_quickly(tmp_path, env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HOME": str(tmp_path / "hf"), **env}
    t = time.time()
    r = subprocess.run([sys.executable, "train_vision_real.py", "--data-source", "huggingface",
                        "--dataset-name", "nlphuji/flickr30k", "--output", str(tmp_path / "m.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("错误：")]
    assert len(errors) == 1 and "无法连接 Hugging Face Hub" in errors[0] and "HF_ENDPOINT" in errors[0]
    assert ("连不上 Hugging Face Hub" in r.stderr) == ("HF_ENDPOINT" in env)     # the probe said so, once
    assert time.time() - t < 60


def test_imagefolder_copy(tmp_path):
    root = tmp_path / "imgf"
    (root / "train").mkdir(parents=True)
    for i in range(3):
        (root / "train" / f"{i}.png").write_bytes(encode(photo(seed=i), "PNG"))
    (root / "train" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "caption": f"picture {i}"}) + "\n" for i in range(3)))
    train, val = load_hf(str(root), "train")
    assert sorted(c[0] for c in train.captions) == ["picture 0", "picture 1", "picture 2"] and val is None
    assert len(check_images(CaptionSet(train, 16), 0.0)) == 3


def test_unreachable_hub_is_detected_by_one_probe_not_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")        # nothing listens there
    t = time.time()
    assert hub.hub_reachable() is False and time.time() - t < 5


def test_the_source_registry_reads_tables_and_streams(tmp_path):
    path = str(flickr_parquet(tmp_path / "f"))
    table = sources.read("huggingface", path, sources.Options())
    assert [r.row for r in table.train.refs] == list(range(8)) and len(table.val.refs) == 3
    stream = sources.read("huggingface", path, sources.Options(streaming=True))
    assert isinstance(stream, sources.Stream) and len(stream.val.refs) == 3
    assert stream.texts() == table.texts()[:40] + table.val.texts()       # 8 train rows x 5, then validation
