"""The data side under torchrun (two CPU processes, gloo), through train_vision_real.py itself:
rank 0 alone decodes the images for the start-up check and both ranks train on its kept set;
a streamed data set of an odd number of shards, unevenly filled, gives both ranks the same steps.

The same file is the worker torchrun starts (see `worker()` at the bottom)."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_captions import encode, photo  # noqa: E402
from test_train_real import guide_folder  # noqa: E402

GOOD, SHARDS = 12, (5, 3, 2)       # local images; rows of the streamed set's three shards
TINY = ["--preset", "micro", "--vocab-size", "300", "--batch-size", "2", "--eval-size", "0", "--device", "cpu",
        "--precision", "fp32", "--workers", "0"]


def parquet_shards(root: Path, sizes) -> Path:
    """A local streamed data set: one parquet file (a shard) of photos per size."""
    from datasets import Dataset, Image as HFImage
    root.mkdir()
    row = 0
    for s, n in enumerate(sizes):
        table = Dataset.from_dict({"image": [{"bytes": encode(photo((40, 30), seed=row + i)), "path": f"{row + i}.jpg"}
                                             for i in range(n)],
                                   "caption": [f"photo number {row + i}" for i in range(n)]})
        table.cast_column("image", HFImage()).to_parquet(str(root / f"train-{s:05d}-of-{len(sizes):05d}.parquet"))
        row += n
    return root


def make_data(tmp: Path):
    """A local folder of GOOD photos and one broken file; a parquet folder of three shards."""
    folder = guide_folder(tmp / "folder", GOOD)
    (folder / "images" / "坏.jpg").write_bytes(b"not an image at all")
    caps = json.loads((folder / "captions.json").read_text(encoding="utf-8"))
    (folder / "captions.json").write_text(json.dumps({**caps, "坏.jpg": "坏图"}, ensure_ascii=False), encoding="utf-8")
    parquet_shards(tmp / "stream", SHARDS)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp-data")
    make_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)], r.stderr


def test_rank0_alone_checks_the_images_and_both_ranks_train_on_its_kept_set(ran):
    rec, err = ran
    every = {f"照片{i}.jpg" for i in range(GOOD)} | {"坏.jpg"}
    folder = [r["folder"] for r in rec]
    assert sorted(folder[0]["check_opens"]) == sorted(every)          # each image decoded once, on rank 0
    assert folder[1]["check_opens"] == []                            # rank 1 took rank 0's result
    assert rec[0]["raised"] and rec[1]["raised"]                       # rank 0's error reaches rank 1 too
    assert err.count("跳过 1/13 张无法使用的图片") == 2                   # both ranks know the same bad image
    # 11 of the 12 good images train (one held out): 2 global batches of 2 x 2 per epoch, the
    # ranks' halves disjoint - the same kept set and order on both, the broken image on neither
    train = [set(f["train_opens"]) for f in folder]
    assert folder[0]["steps"] == folder[1]["steps"] == [1, 2]
    assert not train[0] & train[1] and "坏.jpg" not in train[0] | train[1]
    assert len(train[1]) == 4 and len(train[0]) == 5                   # rank 0 also scores the held-out one


def test_an_odd_number_of_uneven_shards_gives_every_rank_the_same_steps(ran):
    rec, _ = ran
    stream = [r["stream"] for r in rec]
    # 10 rows, the first held out for validation; 3 shards cannot be dealt out whole to 2 ranks,
    # so each rank reads every other row (5 and 4); a streamed epoch is --steps-per-epoch x
    # --batch-size = 8 samples, 2 steps of 2 x 2, whatever each rank's share
    assert stream[0]["steps"] == stream[1]["steps"] == [1, 2, 3, 4]
    share = [s["share"] for s in stream]
    assert sorted(map(len, share)) == [4, 5] and not set(share[0]) & set(share[1])   # disjoint rows


@pytest.mark.parametrize("shards, per_rank", [(4, 2), (3, 3)])
def test_loader_workers_are_capped_at_the_shards_of_this_rank(shards, per_rank, tmp_path, monkeypatch):
    """datasets deals each DataLoader worker whole shards of the rank's split; a worker left
    without one would read an empty stream. 4 shards on 2 ranks: 2 each; 3: every rank keeps all 3."""
    import sources
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    o = sources.Options(streaming=True, workers=4, steps_per_epoch=2, batch_size=2, eval_size=1)
    data = sources.Sources([sources.read("huggingface", str(parquet_shards(tmp_path / "s", [2] * shards)), o)], o)
    sets = data.training_data(16)
    assert sets.workers == per_rank and sets.train.shards() == per_rank


def worker(tmp: Path):
    import torch.distributed as dist
    import train_vision_real
    import trainer
    from distributed import on_rank0
    rank = int(os.environ["RANK"])
    opens = []

    def audit(event, args):                 # every image file opened, and by which thread
        if event == "open" and isinstance(args[0], str) and "/images/" in args[0]:
            opens.append((Path(args[0]).name, threading.current_thread() is threading.main_thread()))
    sys.addaudithook(audit)
    steps, data = [], []
    real_step = trainer.Trainer.optimizer_step

    def counting(self):                     # the optimizer steps this rank takes, and its data
        steps.append(self.step + 1)
        data[:] = [self.train_data.parts[0]]
        return real_step(self)
    trainer.Trainer.optimizer_step = counting

    train_vision_real.main(["--data-path", str(tmp / "folder"), "--epochs", "1", "--max-bad-ratio", "0.5",
                            "--output", str(tmp / "folder.pt"), *TINY])
    try:                                    # rank 0 failing: every rank raises, none waits for it
        on_rank0(lambda: 1 / 0)
        raised = False
    except ZeroDivisionError:
        raised = True
    record = {"raised": raised, "folder": {"check_opens": [n for n, main in opens if not main], "steps": steps[:],
                         "train_opens": [n for n, main in opens if main]}}
    steps.clear()
    train_vision_real.main(["--dataset-name", str(tmp / "stream"), "--streaming", "--shuffle-buffer", "1",
                            "--steps-per-epoch", "4", "--epochs", "2", "--output", str(tmp / "stream.pt"), *TINY])
    share = [row["caption"] for row in data[0].stream]          # this rank's rows of one pass
    record["stream"] = {"steps": steps, "share": share}
    (tmp / f"rank{rank}.json").write_text(json.dumps(record, ensure_ascii=False))
    dist.barrier()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
