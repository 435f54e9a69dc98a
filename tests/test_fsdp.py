"""FSDP2 (--fsdp): two CPU processes under torchrun (gloo), fp32 so the comparison can be tight.

One torchrun job (this file is its worker, see `worker()`) trains the same tiny model three times
on two ranks that start from different weights: with DDP, with FSDP, and with FSDP stopped by a
signal after STOP_AT steps and resumed by a fresh trainer. The test compares the per-step losses
(FSDP vs DDP), the final weights (resumed vs uninterrupted), who wrote files, and reads the files
FSDP wrote the way a single process does."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import load_checkpoint, read_file, resume_path  # noqa: E402
from test_distributed import build  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from trainer import Trainer, TrainingInterrupted  # noqa: E402

STOP_AT = 6           # the interrupted FSDP run's rank 1 "receives" SIGTERM after this optimizer step (of 8)
RUNS = ("ddp", "fsdp", "stopped")
SHAPE = dict(epochs=2, accum=2, batch_size=4)      # 64 samples: 4 optimizer steps of 2 x 4 x 2 ranks per epoch


@pytest.fixture
def own_tmp():
    path = Path(tempfile.mkdtemp(prefix="vlm-fsdp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def resume_weights(out: Path) -> dict:
    return read_file(resume_path(out / "m.pt"), "断点文件", "vlm-resume")["checkpoint"]["model"]


def test_fsdp_matches_ddp_resumes_exactly_and_only_rank0_writes(tok, own_tmp):
    tmp = own_tmp
    (tmp / "tok.json").write_text(tok.to_str(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__)), str(tmp)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = [json.loads((tmp / f"rank{i}.json").read_text()) for i in range(2)]

    # every rank, every step: FSDP's loss is DDP's (same data, rank 0's weights broadcast in both)
    for i in range(2):
        ddp, fsdp = torch.tensor(rec[i]["ddp"]["losses"]), torch.tensor(rec[i]["fsdp"]["losses"])
        assert len(ddp) == len(fsdp) == 16                     # 2 epochs x 4 steps x accumulation 2
        assert torch.allclose(fsdp, ddp, rtol=1e-4, atol=1e-5), (fsdp - ddp).abs().max()
        assert ddp[-1] < ddp[0]                                 # and it learns
    assert rec[0]["fsdp"]["initially_different"]
    assert abs(rec[0]["fsdp"]["val_before"] - rec[0]["ddp"]["val_before"]) < 1e-5
    ddp_w, fsdp_w = resume_weights(tmp / "ddp"), resume_weights(tmp / "fsdp")
    assert max(float((fsdp_w[k] - ddp_w[k]).abs().max()) for k in ddp_w) < 1e-4

    # stopped together after STOP_AT steps, resumed by new trainers: the very same final weights
    assert rec[0]["stopped"]["interrupted"] and rec[1]["stopped"]["interrupted"]
    assert rec[0]["stopped"]["steps"] == rec[1]["stopped"]["steps"] == STOP_AT
    assert rec[0]["resumed"]["steps"] == 8 and rec[0]["resumed"]["start"] == STOP_AT
    resumed = resume_weights(tmp / "stopped")
    assert all(torch.equal(resumed[k], fsdp_w[k]) for k in fsdp_w), "resumed run ends elsewhere"

    # rank 0 generated samples alone at each epoch end (the weights gathered for it) ...
    assert rec[0]["fsdp"]["generated"] == 2 and rec[1]["fsdp"]["generated"] == 0
    # ... and alone wrote files: checkpoint, resume state, log
    for run in RUNS:
        assert rec[1][run]["writes"] == [], run
        assert {Path(p).name for p in rec[0][run]["writes"]} >= {"m.pt", "m.resume.pt", "m.log.jsonl"}, run

    # the files are the usual ones: the model loads, the resume state restores in one plain process
    model, _, meta = load_checkpoint(tmp / "fsdp" / "m.pt")
    assert meta["epoch"] >= 1 and set(model.state_dict()) == set(fsdp_w)
    plain = build(tok, tmp / "fsdp", cls=Trainer, resume=True, **SHAPE)
    plain.load_resume()
    assert plain.step == 16 and all(torch.equal(plain.model.state_dict()[k], fsdp_w[k]) for k in fsdp_w)
    assert len(plain.opt.state) == sum(len(g["params"]) for g in plain.opt.param_groups)


# ----------------------------------------------------------------------------- the torchrun worker

class Recording:
    """Mixed into a trainer: each micro-batch's language-model loss, the optimizer steps taken."""

    def train_batch(self, batch, sync: bool):
        loss = super().train_batch(batch, sync)
        self.record["losses"].append(float(loss))
        return loss

    def optimizer_step(self):
        ok = super().optimizer_step()
        if self.stop_at == self.step and self.rank == 1:
            self.stop_signal = signal.SIGTERM
        return ok


def run(tok, out: Path, kind: str, resume=False, stop_at=None) -> dict:
    from sharding import FSDPTrainer
    cls = type("Recorded", (Recording, FSDPTrainer if kind != "ddp" else Trainer), {})
    t = build(tok, out, cls=cls, fsdp=kind != "ddp", resume=resume, **SHAPE)
    t.record, t.stop_at = {"losses": [], "generated": 0}, stop_at
    starts = [torch.empty_like(t.initial_weights) for _ in range(t.world)]
    torch.distributed.all_gather(starts, t.initial_weights)
    t.record["initially_different"] = not torch.equal(starts[0], starts[1])

    def on_epoch_end(model, epoch):                    # as train_vision.py's samples: rank 0 alone
        from evaluate import generate_texts
        sample = t.val_data[0]
        generate_texts(model, tok, [{"image": sample["image"], "messages": sample["messages"][:1]}], max_new_tokens=8)
        t.record["generated"] += 1
    t.on_epoch_end = on_epoch_end
    if resume:
        t.load_resume()
        t.cfg.resume = False
    t.record["start"] = t.step
    t.record["val_before"] = t.evaluate_loss(t.val_data)     # under FSDP: gathered before any training step
    try:
        t.fit()
        t.record["interrupted"] = False
    except TrainingInterrupted:
        t.record["interrupted"] = True
    t.record["steps"] = t.step
    return t.record


def worker(tmp: Path):
    writes = []

    def audit(event, args):              # every file this process opens for writing under tmp/<run>
        if event == "open" and any(c in str(args[1] or "r") for c in "wax+"):
            writes.append(str(args[0]))
        elif event in ("os.rename", "os.replace"):
            writes.append(str(args[1]))
    sys.addaudithook(audit)
    tok = Tokenizer.from_str((tmp / "tok.json").read_text(encoding="utf-8"))
    record = {}
    for kind in RUNS:
        record[kind] = run(tok, tmp / kind, kind, stop_at=STOP_AT if kind == "stopped" else None)
        record[kind]["writes"] = sorted({w for w in writes if w.startswith(str(tmp / kind))})
    record["resumed"] = run(tok, tmp / "stopped", "fsdp", resume=True)
    rank = int(os.environ["RANK"])
    (tmp / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
