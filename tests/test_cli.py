"""The demo's command line, run as a user would run it."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_is_chinese_and_lists_the_guides_flags():
    out = run("train_vision.py", "--help").stdout
    for flag in ["--batch-size", "--epochs", "--lr", "--checkpoint", "--output", "--resume", "--seed", "--device"]:
        assert flag in out
    assert "批次大小" in out and "学习率" in out


def test_micro_run_trains_saves_and_reports(tmp_path):
    out = tmp_path / "m.pt"
    r = run("train_vision.py", "--preset", "micro", "--epochs", "2", "--train-size", "64", "--val-size", "16",
            "--batch-size", "16", "--eval-scenes", "4", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert re.search(r"Epoch 2/2: 100%\|.*\| 4/4 \[\d\d:\d\d<00:00, loss=\d+\.\d\d, avg=\d+\.\d\d, lr=\d\.\de-\d\d\]",
                     r.stderr), r.stderr
    assert "Epoch 1 完成, 平均损失: " in r.stdout and "→ 新的最佳损失! 保存模型..." in r.stdout
    assert "精确匹配" in r.stdout
    assert torch.load(out, weights_only=True)["meta"]["lang"] == "zh"
    log = [json.loads(l) for l in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in log] == [1, 2] and "val_loss" in log[0]
    # the machine's reference figure and the time taken, printed and logged for comparing machines
    assert "本机参考算力" in r.stdout and re.search(r"\n训练用时 \d", r.stdout)
    assert log[0]["machine_gflops"]["fp32"] > 0 and 0 < log[0]["elapsed_s"] <= log[1]["elapsed_s"]


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "-1"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--hide", "1"], "--hide"),
    (["--recolour", "-0.1"], "--recolour"),
    (["--reshape", "1.5"], "--reshape"),
    (["--muon-steps", "0"], "--muon-steps"),
    (["--checkpoint", "/nonexistent/model.pt"], "找不到"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "设备"),
])
def test_bad_input_gets_one_chinese_line_and_nonzero_exit(args, needle, tmp_path):
    r = run("train_vision.py", "--preset", "micro", "--output", str(tmp_path / "m.pt"), *args, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("错误：") and needle in lines[0], r.stderr


@pytest.mark.parametrize("script, args, needle", [
    ("train_vision.py", ["--epochs", "abc"], "参数 --epochs 需要一个整数，收到的是 'abc'"),
    ("train_vision.py", ["--batch-size", "many"], "参数 --batch-size 需要一个正整数或 auto，收到的是 'many'"),
    ("train_vision.py", ["--preset", "huge"], "参数 --preset 不能取 'huge'，可选：'demo', 'micro', 'small', 'tiny'"),
    ("train_vision.py", ["--bogus"], "无法识别的参数：--bogus"),
    ("train_vision_real.py", ["--data-source"], "参数 --data-source 后面缺少取值"),
    ("serve.py", ["--port", "x"], "参数 --port 需要一个整数"),
    ("export_hf.py", [], "缺少必需的参数：--output"),
    ("scenes.py", ["--count", "1.5"], "参数 --count 需要一个整数"),
    ("evaluate.py", ["--lang", "fr"], "参数 --lang 不能取 'fr'"),
])
def test_command_line_mistakes_are_one_chinese_line_in_every_command(script, args, needle):
    r = run(script, *args, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    line, = r.stderr.splitlines()                                 # one line, no usage dump, no traceback
    assert line.startswith("错误：" + needle) and line.endswith(f"。用 {script} --help 查看全部参数。")


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    r = run("train_vision.py", "--checkpoint", str(bad), "--output", str(tmp_path / "m.pt"), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("错误：")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    r = run("evaluate.py", "--checkpoint", str(foreign), timeout=60)
    assert r.returncode == 2 and "不是本工具保存的" in r.stderr and "Traceback" not in r.stderr


def test_a_busy_api_port_is_one_chinese_line(tok, tiny, tmp_path):
    import socket
    from checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "m.pt", tiny, tok)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("serve.py", "--checkpoint", str(tmp_path / "m.pt"), "--port", str(port), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("错误：")
    assert f"端口 {port} 已被占用" in r.stderr and "--port" in r.stderr and "Traceback" not in r.stderr


def test_a_run_on_other_data_never_replaces_the_demo_model(tmp_path):
    """The guide's local command after `make demo` used to replace the demo model silently (same
    default --output) and append to its log."""
    import hashlib
    out = tmp_path / "vision_trained_model.pt"
    demo = ["train_vision.py", "--preset", "micro", "--epochs", "1", "--train-size", "16", "--val-size", "4",
            "--batch-size", "8", "--eval-scenes", "0", "--workers", "0", "--output", str(out)]
    assert run(*demo).returncode == 0
    assert not out.with_name(out.stem + ".resume.pt").exists()        # a finished run leaves no resume state
    assert run(*demo).returncode == 0                                   # the same run again replaces it freely
    digest, log = hashlib.sha256(out.read_bytes()).hexdigest(), out.with_suffix(".log.jsonl").read_text()
    assert len(log.splitlines()) == 1                                   # each fresh run starts a fresh log
    assert run("scenes.py", "--out", str(tmp_path / "mine"), "--count", "12").returncode == 0
    real = ["train_vision_real.py", "--data-source", "local", "--data-path", str(tmp_path / "mine"), "--preset", "micro",
            "--epochs", "1", "--batch-size", "4", "--eval-size", "0", "--workers", "0", "--output", str(out)]
    r = run(*real)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("错误："), r.stderr[-2000:]
    assert "内置合成场景" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest and out.with_suffix(".log.jsonl").read_text() == log
    r = run(*real, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(out, weights_only=True)["meta"]["data"] == [str(tmp_path / "mine")]
    assert len(out.with_suffix(".log.jsonl").read_text().splitlines()) == 1


def data_mistakes(tmp: Path) -> dict:
    """--dataset-name values a user gets wrong -> what the one error line must say."""
    (tmp / "no_data").mkdir()
    (tmp / "empty.parquet").write_bytes(b"")
    (tmp / "notes.xyz").write_text("hello")
    (tmp / "broken.tar").write_bytes(b"\x01" * 2000)
    (tmp / "broken.jsonl").write_text('{"image": ')
    return {"data/shards/*.tar": "通配符 data/shards/*.tar 没有匹配到任何文件",
            str(tmp / "x" / "*.parquet"): "没有匹配到任何文件",
            str(tmp / "empty.parquet"): "是空文件（0 字节）",
            str(tmp / "no_data"): "里没有可读的数据文件",
            str(tmp / "notes.xyz"): "不是能识别的数据文件（扩展名 .xyz）",
            str(tmp / "broken.tar"): "请检查文件是否完整",
            str(tmp / "broken.jsonl"): str(tmp / "broken.jsonl")}


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["table", "stream"])
def test_dataset_name_mistakes_are_one_chinese_line(tmp_path, streaming, capsys):
    """The first mistake as a user's process (exit status, no traceback); the rest through the same
    main() in this process, which is what that process runs (a subprocess each cost ~7 s of imports)."""
    import train_vision_real
    mistakes = list(data_mistakes(tmp_path).items())
    name, needle = mistakes[0]
    r = run("train_vision_real.py", "--dataset-name", name, *streaming, "--output", str(tmp_path / "m.pt"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("错误：") and needle in r.stderr, r.stderr
    for name, needle in mistakes[1:]:
        with pytest.raises(SystemExit) as e:
            train_vision_real.main(["--dataset-name", name, *streaming, "--output", str(tmp_path / "m.pt")])
        err = capsys.readouterr().err
        assert e.value.code == 2, (name, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("错误：") and needle in last, (name, err)
