"""train_vision_real.py end to end: the guide's two commands as written, bad data, mixing,
streaming, webdataset, --select-by cider, --checkpoint, and evaluate.py on real data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train_vision_real
from test_captions import encode, make_local_folder, photo
from test_captions_hf import f8k_parquet, fake_hub, flickr_disk, flickr_parquet, webdataset_shard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, OpenMP's spin-waiting made these
    small steps 10-20x slower with two threads. Behaviour is the same either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train_vision_real.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def guide_folder(root: Path, n: int) -> Path:
    """The guide's layout: images/*.jpg and captions.json {"name.jpg": "描述"}."""
    (root / "images").mkdir(parents=True)
    caps = {}
    for i in range(n):
        name = f"照片{i}.jpg"
        (root / "images" / name).write_bytes(encode(photo((80, 60), seed=i)))
        caps[name] = ["一只橙色的猫坐在窗台上", "雪山在蓝天白云下", "繁华的城市街道"][i % 3] + f"，第{i}张"
    (root / "captions.json").write_text(json.dumps(caps, ensure_ascii=False), encoding="utf-8")
    return root


def log_records(out: Path):
    return [json.loads(l) for l in out.with_suffix(".log.jsonl").read_text(encoding="utf-8").splitlines()]


def main(argv, capsys):
    """Run the command in this process (no start-up cost); (exit code, stdout, stderr)."""
    try:
        train_vision_real.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_guides_flags_and_defaults(capsys):
    code, out, _ = main(["--help"], capsys)
    assert code == 0
    for flag in ("--data-source", "--data-path", "--dataset-name", "--batch-size", "--epochs", "--lr",
                 "--checkpoint", "--output", "--streaming", "--all-captions", "--select-by", "--max-bad-ratio"):
        assert flag in out, flag
    assert "批次大小 (默认: 8)" in out and "训练轮数 (默认: 10)" in out and "学习率 (默认: 0.0001)" in out
    assert "数据源: local 或 huggingface" in out and "HuggingFace数据集名称" in out


def test_guide_local_command_runs_as_written(tmp_path):
    """As a user runs it: a subprocess in a folder holding data/vision_train (4 images: one batch
    of 4 per epoch, too few to hold any out for validation)."""
    guide_folder(tmp_path / "data" / "vision_train", 4)
    r = run("--data-source", "local", "--data-path", "data/vision_train", "--batch-size", "4", "--epochs", "20",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "训练样本 4 条/轮，没有验证集" in r.stdout
    assert r.stdout.count("提示：从头训练、每轮只有 4 个样本") == 1      # printed once, before training
    assert "Epoch 20/20: 100%" in r.stderr and "Epoch 20 完成, 平均损失: " in r.stdout
    assert "→ 新的最佳损失! 保存模型..." in r.stdout
    out = tmp_path / "checkpoints" / "vision_trained_model.pt"
    log = log_records(out)
    assert len(log) == 20 and log[-1]["train_loss"] < log[0]["train_loss"]
    assert torch.load(out, weights_only=True)["meta"]["lang"] == "zh"


@pytest.mark.parametrize("flags, samples, hint", [
    ([], 285, True),                                   # the guide's local command on a 300-image export
    (["--lr", "1e-3"], 285, True),                     # measured: a higher lr alone does not help
    ([], 5000, False),                                 # enough data to learn from scratch
    (["--checkpoint", "base.pt"], 285, False),         # starts from a trained model
    (["--vision-encoder", "openai/clip-vit-base-patch16"], 285, False),
])
def test_from_scratch_on_little_data_gets_a_hint(flags, samples, hint):
    a = train_vision_real.build_parser().parse_args(["--data-path", "d", "--batch-size", "4", "--epochs", "5", *flags])
    line = train_vision_real.scratch_hint(a, samples)
    assert (line is not None) == hint
    if hint:
        assert line.startswith("提示：") and "\n" not in line and "docs/datasets.md" in line


def test_guide_huggingface_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """The hub id goes through the hub branch (parquet revision chosen, said); the answer comes
    from a local copy with Flickr30k's exact schema, since the hub is unreachable here."""
    calls = []
    fake_hub(monkeypatch, {"nlphuji/flickr30k": (flickr_parquet(tmp_path / "hub", n_train=8, n_val=2, n_test=2), True)},
             calls)
    monkeypatch.chdir(tmp_path)
    train_vision_real.main(["--data-source", "huggingface", "--dataset-name", "nlphuji/flickr30k",
                            "--batch-size", "8", "--epochs", "10", "--lr", "1e-4"])
    out, err = capsys.readouterr()
    assert calls == [("nlphuji/flickr30k", "refs/convert/parquet")]
    assert "revision=refs/convert/parquet" in err and "按 split 列筛选" in err
    assert "训练样本 8 条/轮，验证图片 2 张" in out and "Epoch 10 完成" in out
    assert "（2 张图，英文按词切分）" in out and "参考: A val photo number" in out
    log = log_records(tmp_path / "checkpoints" / "vision_trained_model.pt")
    assert [l["epoch"] for l in log] == list(range(1, 11)) and log[0]["tokenisation"] == "word"


def test_bad_images_stop_the_run_before_training_or_are_skipped(tmp_path, capsys):
    data = make_local_folder(tmp_path / "bad")
    out = tmp_path / "m.pt"
    code, _, err = main(["--data-source", "local", "--data-path", str(data), "--output", str(out),
                         "--preset", "micro"], capsys)
    assert code == 2 and "Traceback" not in err
    errors = [l for l in err.splitlines() if l.startswith("错误：")]
    assert len(errors) == 1 and "6/18 张图片无法使用" in errors[0] and "训练未开始" in errors[0]
    assert "truncated.jpg" in errors[0] and not out.exists()
    code, text, err = main(["--data-path", str(data), "--output", str(out), "--preset", "micro", "--epochs", "1",
                            "--batch-size", "4", "--max-bad-ratio", "0.5", "--eval-size", "2"], capsys)
    assert code == 0, err[-2000:]
    assert "跳过 6/18 张无法使用的图片" in err and "训练样本 11 条/轮，验证图片 1 张" in text and out.exists()


def test_mixed_sources_with_weights_webdataset_and_select_by_cider(tmp_path, capsys):
    folder = guide_folder(tmp_path / "zh", 10)
    flickr = flickr_parquet(tmp_path / "f", n_train=8, n_val=2, n_test=0)
    shard = webdataset_shard(tmp_path / "shard-000000.tar", n=6, corrupt=(3,))
    f8k = f8k_parquet(tmp_path / "f8k")
    out = tmp_path / "m.pt"
    train_vision_real.main(["--data-path", f"{folder}:2", "--dataset-name", str(flickr), "--dataset-name",
                            f"{shard}:0.5", "--dataset-name", str(f8k), "--preset", "micro", "--epochs", "2",
                            "--batch-size", "4", "--max-bad-ratio", "0.3", "--select-by", "cider", "--output", str(out)])
    text, err = capsys.readouterr()
    # 9 local images x 2 (one held out) + 8 flickr train (2 val rows) + half of the 5 good shard
    # images (round(2.5) = 2; 5 images are too few to hold one out) + 6 flickr8k train (2 validation)
    assert "训练样本 34 条/轮，验证图片 5 张" in text, text
    assert f"{shard}#3（不是可识别的图片）" in err
    log = log_records(out)
    meta = torch.load(out, weights_only=True)["meta"]
    best = max(log, key=lambda l: l["cider"])
    assert meta["select_by"] == "cider" and meta["score"] == pytest.approx(-best["cider"], abs=1e-4)
    assert len(meta["data"]) == 4

    # continue from that checkpoint (its tokenizer), streaming a save_to_disk copy
    out2 = tmp_path / "m2.pt"
    disk = flickr_disk(tmp_path / "disk", n_train=8, n_val=2, n_test=0)
    train_vision_real.main(["--dataset-name", str(disk), "--streaming", "--steps-per-epoch", "3",
                            "--checkpoint", str(out), "--epochs", "1", "--batch-size", "4",
                            "--eval-size", "2", "--output", str(out2)])
    text, _ = capsys.readouterr()
    assert "训练样本 12 条/轮，验证图片 2 张" in text and "Epoch 1 完成" in text
    a, b = torch.load(out, weights_only=True), torch.load(out2, weights_only=True)
    assert a["tokenizer"] == b["tokenizer"] and b["meta"]["base"] == str(out)

    # evaluate.py computes the same metrics for any checkpoint and data
    js = tmp_path / "e.json"
    evaluate.main(["--checkpoint", str(out2), "--dataset-name", str(flickr), "--split", "val", "--json", str(js)])
    text, _ = capsys.readouterr()
    result = json.loads(js.read_text(encoding="utf-8"))
    assert "BLEU-4" in text and "CIDEr-D" in text and result["items"] == 2 and result["tokenisation"] == "word"
    assert 0 <= result["bleu4"] <= 1 and result["cider"] >= 0


@pytest.mark.parametrize("args, needle", [
    (["--data-source", "huggingface"], "--dataset-name"),
    ([], "请指定训练数据"),
    (["--data-path", "/nonexistent/folder"], "找不到本地数据文件夹"),
    (["--data-path", "x", "--select-by", "cider", "--eval-size", "0"], "--select-by cider"),
    (["--data-path", "x", "--streaming"], "--streaming"),
    (["--dataset-name", "/nonexistent/file.parquet"], "找不到数据集"),
])
def test_bad_flags_get_one_chinese_line(args, needle, tmp_path, capsys):
    code, _, err = main([*args, "--output", str(tmp_path / "m.pt")], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("错误：") and needle in lines[0], err
