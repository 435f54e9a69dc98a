"""Nothing lost under crashes: SIGKILL/SIGTERM/Ctrl-C during training, kills during a checkpoint
write, NaN/Inf steps, a full or read-only disk, and checkpoint files crafted to run code.

The disk tests mount real tiny tmpfs file systems (root is needed: chmod does not stop root)."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import scenes
from checkpoint import load_checkpoint, read_file
from collate import Collator
from errors import UserError
from model import VLM
from tests.conftest import tiny_config
from trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}   # same thread count in every run
MICRO = ["--preset", "micro", "--epochs", "2", "--train-size", "96", "--val-size", "4", "--batch-size", "8",
         "--eval-scenes", "0", "--precision", "fp32", "--save-every", "1", "--workers", "0"]


def start(script, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env={**ENV, **kw.pop("env", {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path: Path, proc: subprocess.Popen, timeout=120.0):
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            out, err = proc.communicate()
            pytest.fail(f"{path} never appeared (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.005)


def weights(path: Path) -> dict:
    obj = torch.load(path, weights_only=True)
    return obj["checkpoint"]["model"] if "checkpoint" in obj else obj["model"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_trainer(tmp_path, tok, cls=Trainer, logs=None, **kw):
    """2 epochs x 6 steps of a tiny model on synthetic scenes, resume state saved at epoch ends."""
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    model = VLM(cfg)
    train = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size)
    tc = TrainConfig(**{**dict(epochs=2, batch_size=8, lr=3e-3, output=str(tmp_path / "m.pt"), precision="fp32",
                               save_every=100, workers=0), **kw})
    return cls(model, tok, train, Collator(tok, cfg), tc, log=(logs.append if logs is not None else lambda *a: None))


# ----------------------------------------------------------------------------- crashes

def test_killed_or_stopped_runs_resume_to_the_same_weights(tmp_path):
    """SIGKILL mid-epoch, SIGTERM and Ctrl-C (SIGINT) against an uninterrupted run of the same
    command. Killed and terminated runs restarted with --resume end bit-identical to it."""
    runs = {name: tmp_path / name / "m.pt" for name in ("straight", "kill", "term", "int")}
    procs = {"straight": start("train_vision.py", *MICRO, "--output", str(runs["straight"]))}
    sent = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
    for name, sig in sent.items():     # one at a time: a run started early could finish (2 s on a quiet machine)
        procs[name] = start("train_vision.py", *MICRO, "--output", str(runs[name]))   # before its signal
        wait_for(runs[name].with_name("m.resume.pt"), procs[name])   # the first resume save: the loop runs
        procs[name].send_signal(sig)
    results = {name: (p.wait(180), *p.communicate()) for name, p in procs.items()}
    assert results["straight"][0] == 0, results["straight"][2][-3000:]
    assert results["kill"][0] == -signal.SIGKILL
    killed = torch.load(runs["kill"].with_name("m.resume.pt"), weights_only=True)
    assert killed["epoch"] == 0 and 0 < killed["batch_in_epoch"] < 12        # died mid-epoch
    for name in ("term", "int"):
        code, out, err = results[name]
        assert code == 130, err[-3000:]
        assert "Traceback" not in err
        line = next(l for l in err.splitlines() if "训练已暂停" in l)
        assert str(runs[name].with_name("m.resume.pt")) in line
        again = "python train_vision.py " + " ".join(MICRO) + f" --output {runs[name]} --resume"
        assert line.endswith("继续训练：" + again), line                   # the same command + --resume
        state = read_file(runs[name].with_name("m.resume.pt"), "断点文件", "vlm-resume")
        assert 0 < state["step"] < 24
    resumed = {name: start("train_vision.py", *MICRO, "--output", str(runs[name]), "--resume")
               for name in ("kill", "term")}
    for name, p in resumed.items():
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        assert "从断点继续" in out
        assert_same_weights(runs["straight"], runs[name])
        assert not runs[name].with_name("m.resume.pt").exists()      # a finished run leaves no resume state
    assert not runs["straight"].with_name("m.resume.pt").exists()


def test_resume_with_other_model_flags_is_one_clear_message(tok, tmp_path):
    """A resume state continued with another model (as --preset micro continued as tiny would)."""
    from checkpoint import atomic_save
    t = small_trainer(tmp_path, tok)
    atomic_save(t.state(), tmp_path / "m.resume.pt")
    other = VLM(tiny_config(tok, lm_dim=64))
    t2 = Trainer(other, tok, t.train_data, Collator(tok, other.cfg),
                 TrainConfig(epochs=1, batch_size=8, output=str(tmp_path / "m.pt"), precision="fp32", workers=0,
                             resume=True))
    with pytest.raises(UserError, match="权重与当前模型结构不符.*相同的参数"):
        t2.fit()


WRITER = """
import sys, torch
from checkpoint import atomic_save
path, big = sys.argv[1], torch.randn(3_000_000)
n = 0
while True:
    n += 1
    atomic_save({"format": "vlm-checkpoint", "version": 1, "n": n, "w": big + n}, path)
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_file_readable(tmp_path):
    """A writer saving 12 MB checkpoints in a loop is SIGKILLed while its temp file exists (that
    is, inside atomic_save, before the rename), twice: the target is always a whole,
    readable checkpoint; the next save removes the dead writer's temp file."""
    from checkpoint import atomic_save
    path = tmp_path / "m.pt"
    atomic_save({"format": "vlm-checkpoint", "version": 1, "n": 0, "w": torch.zeros(3)}, path)
    seen = []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=ENV)
        tmp = tmp_path / f".m.pt.tmp{proc.pid}"
        end = time.monotonic() + 60
        while not (tmp.exists() and tmp.stat().st_size > 0 and path.stat().st_size > 1_000_000):
            assert proc.poll() is None and time.monotonic() < end, "writer never started writing"
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        assert tmp.exists()                                     # it really died mid-write
        obj = read_file(path)
        assert torch.equal(obj["w"], torch.load(path, weights_only=True)["w"])
        seen.append(obj["n"])
        assert obj["w"].shape == (3_000_000,) and float(obj["w"][0] - obj["w"][1]) != 0
    assert all(n >= 1 for n in seen)
    atomic_save({"format": "vlm-checkpoint", "version": 1, "n": -1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]      # stale temp files are gone


# ----------------------------------------------------------------------------- numerical faults

class FaultyTrainer(Trainer):
    """Test-only fault injection: the forward pass of chosen batches (counted from 1) returns a
    NaN loss, or its backward pass an infinite gradient; files on disk are fingerprinted when the
    first NaN hits."""
    nan_from, nan_steps, inf_steps = None, (), ()
    files, calls = None, 0

    def loss(self, batch):
        loss, lm_loss = super().loss(batch)
        self.calls += 1
        step = self.calls
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            if self.files is None:
                self.files = {p.name: digest(p) for p in Path(self.cfg.output).parent.glob("*.pt")}
            return loss * float("nan"), lm_loss * float("nan")
        if step in self.inf_steps:
            loss.register_hook(lambda g: g * float("inf"))
        return loss, lm_loss


def test_nan_loss_and_inf_gradient_skip_the_step_counted_and_logged(tok, tmp_path):
    logs = []
    t = small_trainer(tmp_path, tok, FaultyTrainer, logs, log_every=1)          # read every step
    t.nan_steps, t.inf_steps = (2,), (4,)
    t.fit()
    assert t.skipped == 2 and t.step == 2 * 6                    # 6 steps per epoch, two of them skipped
    skipped = [m for m in logs if "NaN/Inf" in m and "已跳过" in m]
    assert len(skipped) == 2 and "第 2 步" in skipped[0] and "第 4 步" in skipped[1] and "共跳过 2 步" in skipped[1], logs
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    log = [json.loads(l) for l in (tmp_path / "m.log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [2, 2]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "m.pt").values() if v.is_floating_point())


def test_repeated_faults_stop_the_run_and_keep_the_last_good_checkpoint(tok, tmp_path):
    t = small_trainer(tmp_path, tok, FaultyTrainer, max_bad_steps=3)
    t.nan_from = 8                                               # epoch 2 (steps 7-12) turns bad at step 8
    with pytest.raises(UserError) as e:
        t.fit()
    assert "连续 3 步出现 NaN/Inf" in str(e.value) and "上一个好的检查点未被改动" in str(e.value)
    assert set(t.files) == {"m.pt", "m.resume.pt"}
    assert {p.name: digest(p) for p in tmp_path.glob("*.pt")} == t.files   # untouched since epoch 1
    model, _, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- disk faults

@pytest.fixture
def mount(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (real ENOSPC, real read-only remounts)."""
    points = []

    def make(size: str) -> Path:
        point = tmp_path / f"fs{len(points)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"these tests mount a small tmpfs and need root (CAP_SYS_ADMIN): {r.stderr.strip()}")
        points.append(point)
        return point
    yield make
    for p in points:
        subprocess.run(["umount", "-l", str(p)], check=True)


def fill(folder: Path):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("fault, says", [("full", "磁盘已满"), ("read-only", "文件系统是只读的")])
def test_disk_fault_mid_run_is_one_message_and_keeps_the_previous_checkpoint(tok, tmp_path, mount, fault, says):
    fs = mount("16m")
    seen = {}

    class DiskFaultTrainer(Trainer):
        """After epoch 1's files are written, the disk fills up or turns read-only."""
        def _on_epoch_end(self, model, epoch):
            if epoch == 1:
                seen.update({p.name: digest(p) for p in fs.glob("*.pt")})
                if fault == "full":
                    fill(fs)
                else:
                    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)

    t = small_trainer(tmp_path, tok, DiskFaultTrainer, output=str(fs / "m.pt"))
    t.on_epoch_end = t._on_epoch_end
    with pytest.raises(UserError) as e:
        t.fit()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and says in msg and "之前保存的检查点未受影响" in msg, msg
    assert set(seen) == {"m.pt", "m.resume.pt"}
    assert {p.name: digest(p) for p in fs.glob("*.pt")} == seen
    assert not list(fs.glob(".*tmp*"))                            # no half-written file left
    assert load_checkpoint(fs / "m.pt")[2]["epoch"] == 1
    assert read_file(fs / "m.resume.pt", "断点文件", "vlm-resume")["epoch"] == 1


def test_unwritable_or_too_small_output_fails_before_the_first_step(tok, tmp_path, mount):
    ro = mount("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    t = small_trainer(tmp_path, tok, output=str(ro / "m.pt"))
    with pytest.raises(UserError, match="不可写：文件系统是只读的"):
        t.fit()
    assert t.step == 0 and t.batch_in_epoch == 0
    small = mount("64k")
    t = small_trainer(tmp_path, tok, output=str(small / "m.pt"))
    assert t.resume_bytes() > 64 * 1024
    with pytest.raises(UserError, match=r"只剩 0\.\d MB 可用，保存一次断点就需要约 \d+\.\d MB"):
        t.fit()
    assert t.step == 0 and not list(small.iterdir())


# ----------------------------------------------------------------------------- hostile checkpoints

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def evil_checkpoint(path: Path, marker: Path, kind=RunsCode, fmt="vlm-checkpoint"):
    """A file shaped like ours (format tag, tensors) whose unpickling would run a payload."""
    with open(path, "wb") as f:
        torch.save({"format": fmt, "version": 1, "model": {"w": torch.zeros(2)}, "meta": kind(marker)}, f,
                   pickle_module=pickle)


def test_checkpoints_that_run_code_are_refused_everywhere(tmp_path):
    """Training (--checkpoint, --resume), train_vision_real.py, evaluate.py, export_hf.py and
    serve.py (LLM_CHECKPOINT) refuse the file with one message; the payload never runs."""
    marker = tmp_path / "payload_ran"
    evil, evil2 = tmp_path / "evil.pt", tmp_path / "evil2.pt"
    evil_checkpoint(evil, marker)
    evil_checkpoint(evil2, marker, RunsPython)
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    evil_checkpoint(resume_dir / "m.resume.pt", marker, fmt="vlm-resume")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    scenes.render(*scenes.make_scene(0, "train", 0), 32).convert("RGB").save(data / "images" / "a.png")
    (data / "captions.json").write_text('{"a.png": "一张图"}', encoding="utf-8")
    port = __import__("tests.serve_helpers", fromlist=["free_port"]).free_port()
    runs = {
        "train --checkpoint": start("train_vision.py", *MICRO, "--checkpoint", str(evil), "--output", str(tmp_path / "o1" / "m.pt")),
        "train --resume": start("train_vision.py", *MICRO, "--resume", "--output", str(resume_dir / "m.pt")),
        "train_vision_real": start("train_vision_real.py", "--data-path", str(data), "--checkpoint", str(evil2),
                                   "--epochs", "1", "--output", str(tmp_path / "o2" / "m.pt")),
        "evaluate": start("evaluate.py", "--checkpoint", str(evil2), "--scenes", "2"),
        "export_hf": start("export_hf.py", "--checkpoint", str(evil), "--output", str(tmp_path / "hf")),
        "serve": start("serve.py", "--port", str(port), env={"LLM_CHECKPOINT": str(evil2)}),
    }
    for name, proc in runs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} did not stop on a malicious checkpoint")
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        lines = [l for l in err.splitlines() if l.strip()]
        assert "Traceback" not in err and lines[-1].startswith("错误：") and "不安全" in lines[-1], (name, err[-2000:])
    assert not marker.exists()
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
