"""Data-parallel training: two CPU processes under torchrun (gloo), then resume on one process.

The same file is the worker torchrun starts (see `worker()` at the bottom)."""
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

import probes  # noqa: E402
import scenes  # noqa: E402
from collate import Collator  # noqa: E402
from conftest import tiny_config  # noqa: E402
from model import VLM  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from trainer import TrainConfig, Trainer, TrainingInterrupted, rank_keys  # noqa: E402

STOP_AT = 6          # the worker's rank 1 "receives" SIGTERM a step before this one; the ranks compare
LOG_EVERY = 3        # their stop flags every LOG_EVERY steps, so all stop after step STOP_AT


def build(tok, out: Path, cls=Trainer, **kw):
    torch.manual_seed(int(os.environ.get("RANK", 0)))        # ranks start different: DDP must align them
    cfg = tiny_config(tok)
    model = VLM(cfg)
    train = scenes.SceneDataset(64, "train", 0, "zh", cfg.vit_image_size)
    val = scenes.SceneDataset(16, "test", 1, "zh", cfg.vit_image_size)
    tc = TrainConfig(**{**dict(epochs=3, batch_size=8, lr=3e-3, output=str(out / "m.pt"), precision="fp32",
                               save_every=1, workers=0, log_every=LOG_EVERY), **kw})
    probe = probes.CellProbe(model.vision, cfg.vit_dim)
    initial = torch.cat([p.detach().flatten().clone() for p in list(model.parameters()) + list(probe.parameters())])
    t = cls(model, tok, train, Collator(tok, cfg), tc, val_data=val, aux=probe, log=lambda *a: None)
    t.initial_weights = initial
    return t


def flat_weights(t: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in list(t.model.parameters()) + list(t.aux.parameters())])


def test_rank_keys_split_each_global_batch_evenly():
    order = list(range(100, 150))                                     # 50 samples
    shares = [rank_keys(order, batch=4, world=3, rank=r) for r in range(3)]
    assert [len(s) for s in shares] == [16, 16, 16]                  # 4 whole global batches of 12
    assert sorted(sum(shares, [])) == order[:48]                      # disjoint, nothing repeated
    assert shares[1][:4] == order[4:8] and shares[2][4:8] == order[20:24]
    # accumulation keeps whole optimizer steps only: 40 samples = 1 step of 2 x 12 (+16 dropped)
    assert [len(rank_keys(order[:40], 4, 3, r, accum=2)) for r in range(3)] == [8, 8, 8]
    assert [len(rank_keys(order[:40], 4, 3, r, accum=1)) for r in range(3)] == [12, 12, 12]


@pytest.mark.parametrize("shards", [4, 3])           # 4: whole shards per rank; 3: every other row
def test_streamed_rows_are_split_between_ranks(shards):
    from datasets import Dataset, Image as HFImage
    from captions import Mixture
    from hub import StreamCaptions
    from test_captions import encode, photo
    table = Dataset.from_dict({"image": [{"bytes": encode(photo((20, 20), seed=i)), "path": f"{i}.jpg"} for i in range(8)],
                               "caption": [f"photo {i}" for i in range(8)]}).cast_column("image", HFImage())
    seen = []
    for rank in range(2):
        stream = StreamCaptions(table.to_iterable_dataset(num_shards=shards), "t", length=4, image_size=16, buffer=0)
        mix = Mixture([stream])
        mix.split_by_node(rank, 2)                       # what the trainer calls under torchrun
        seen.append({stream[(0, k)]["messages"][1]["content"] for k in range(4)})
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"photo {i}" for i in range(8)}


EXIT_AFTER_COLLECTIVES = """
import torch, torch.distributed as dist
from distributed import init_distributed
init_distributed(torch.device("cpu"))
for _ in range(50):
    dist.all_reduce(torch.ones(1000))
    dist.all_gather([torch.empty(10) for _ in range(2)], torch.ones(10))
"""


def test_ranks_leave_the_process_group_before_python_shuts_down():
    """A group left to interpreter shutdown lets gloo's threads abort a rank as it exits
    ("terminate called without an active exception": 15 of 25 two-rank runs here without the
    fix, 0 of 25 with it). init_distributed takes the group down at exit; 4 rounds of 2 ranks."""
    from serve_helpers import free_port
    for _ in range(4):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        ranks = [subprocess.Popen([sys.executable, "-c", EXIT_AFTER_COLLECTIVES], cwd=ROOT, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
        for p in ranks:
            out = p.communicate(timeout=120)[0]
            assert p.returncode == 0, out[-2000:]


@pytest.fixture
def own_tmp():
    """A private folder: on a machine shared by several pytest sessions, pytest's own tmp_path
    of a long session can be rotated away by newer sessions while this test still needs it."""
    path = Path(tempfile.mkdtemp(prefix="vlm-ddp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_train_in_step_then_one_process_resumes(tok, own_tmp, optimizer):
    tmp_path = own_tmp
    (tmp_path / "tok.json").write_text(tok.to_str(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), str(tmp_path), optimizer]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]

    # both ranks stopped together after rank 1 alone saw the signal
    assert rec[0]["steps"] == rec[1]["steps"] == list(range(1, STOP_AT + 1))
    assert rec[0]["interrupted"] and rec[1]["interrupted"]
    # identical weights after every optimizer step, though the ranks started from different ones
    assert rec[0]["same_as_rank0"] == rec[1]["same_as_rank0"] == [True] * STOP_AT
    assert rec[0]["initially_different"]
    # each rank saw its own half of every global batch
    assert rec[0]["steps_per_epoch"] == 4 and not set(rec[0]["keys"]) & set(rec[1]["keys"])
    # only rank 0 wrote: checkpoint, resume state, log
    assert rec[1]["writes"] == []
    assert {Path(p).name for p in rec[0]["writes"]} >= {"m.pt", "m.resume.pt", "m.log.jsonl"}
    log = [json.loads(l) for l in (tmp_path / "run" / "m.log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["processes"] == 2

    # one process continues from the checkpoint: same weights, same sample of epoch 2, then learns on
    resumed = build(tok, tmp_path / "run", resume=True, optimizer=optimizer)
    before = resumed.evaluate_loss(resumed.val_data)
    resumed.load_resume()
    assert torch.equal(flat_weights(resumed), torch.load(tmp_path / "weights_rank0.pt"))
    assert resumed.epoch == 1 and resumed.seen_in_epoch == 2 * 16     # 2 of epoch 2's 4 global batches
    assert resumed.step == 8 + 4                                       # 1 process: 8 steps per epoch
    resumed.cfg.resume = False                                         # already loaded
    resumed.fit()
    assert resumed.step == 3 * 8
    log = [json.loads(l) for l in (tmp_path / "run" / "m.log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert log[-1]["val_loss"] < log[0]["val_loss"] and log[-1]["val_loss"] < before
    assert log[0]["val_loss"] < rec[0]["initial_val_loss"]            # the 2-process epoch learned too


# ----------------------------------------------------------------------------- the torchrun worker

class RecordingTrainer(Trainer):
    """After each optimizer step: gather every rank's weights and compare them with rank 0's."""

    def optimizer_step(self):
        ok = super().optimizer_step()
        mine = flat_weights(self)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, mine)
        self.record["steps"].append(self.step)
        self.record["same_as_rank0"].append(all(torch.equal(g, gathered[0]) for g in gathered))
        if self.step == STOP_AT - 1 and self.rank == 1:
            self.stop_signal = signal.SIGTERM
        if self.step == STOP_AT and self.rank == 0:
            torch.save(mine, self.record_dir / "weights_rank0.pt")
        return ok


def worker(tmp: Path, optimizer: str):
    out = tmp / "run"
    writes = []

    def audit(event, args):              # every file this process opens for writing under `out`
        if event == "open" and str(args[0]).startswith(str(out)) and any(c in str(args[1] or "r") for c in "wax+"):
            writes.append(str(args[0]))
        elif event in ("os.rename", "os.replace") and str(args[1]).startswith(str(out)):
            writes.append(str(args[1]))
    sys.addaudithook(audit)

    tok = Tokenizer.from_str((tmp / "tok.json").read_text(encoding="utf-8"))
    t = build(tok, out, cls=RecordingTrainer, optimizer=optimizer)
    t.record_dir = tmp
    t.record = {"steps": [], "same_as_rank0": []}
    starts = [torch.empty_like(t.initial_weights) for _ in range(t.world)]
    torch.distributed.all_gather(starts, t.initial_weights)
    t.record["initially_different"] = not torch.equal(starts[0], starts[1])
    t.record["initial_val_loss"] = t.evaluate_loss(t.val_data)
    t.record["steps_per_epoch"] = t.steps_per_epoch
    t.record["keys"] = [i for _, i in t.loader(t.train_data, 0).sampler]
    try:
        t.fit()
        t.record["interrupted"] = False
    except TrainingInterrupted:
        t.record["interrupted"] = True
    t.record["writes"] = sorted(set(writes))
    (tmp / f"rank{t.rank}.json").write_text(json.dumps(t.record))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
