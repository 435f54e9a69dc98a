import math

import pytest
import torch

import scenes
from collate import Collator
from model import VLM
from trainer import TrainConfig, Trainer, lr_at
from conftest import tiny_config


def test_schedule_warmup_peak_and_end():
    total, warm, peak = 100, 10, 1e-3
    assert lr_at(0, total, peak, warm, 0.1) == pytest.approx(peak / 10)
    assert lr_at(9, total, peak, warm, 0.1) == pytest.approx(peak)
    assert lr_at(10, total, peak, warm, 0.1) == pytest.approx(peak)
    assert lr_at(55, total, peak, warm, 0.1) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr_at(100, total, peak, warm, 0.1) == pytest.approx(peak * 0.1)
    values = [lr_at(s, total, peak, warm, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))          # monotone decay after warmup


def make_trainer(tok, tmp_path, cls=Trainer, **kw):
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    model = VLM(cfg)
    train = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size)
    val = scenes.SceneDataset(16, "test", 1, "zh", cfg.vit_image_size)
    tc = TrainConfig(**{**dict(epochs=2, batch_size=8, lr=3e-3, output=str(tmp_path / "m.pt"),
                               precision="fp32", save_every=2, workers=0), **kw})
    probe = scenes.CellProbe(model.vision, cfg.vit_dim)
    return cls(model, tok, train, Collator(tok, cfg), tc, val_data=val, aux=probe, log=lambda *a: None)


def test_a_tiny_run_lowers_the_loss(tok, tmp_path):
    t = make_trainer(tok, tmp_path, epochs=3)
    before = t.evaluate_loss(t.val_data)
    t.fit()
    after = t.evaluate_loss(t.val_data)
    assert after < before - 1.0, (before, after)
    assert (tmp_path / "m.pt").is_file() and (tmp_path / "m.resume.pt").is_file()
    log = (tmp_path / "m.log.jsonl").read_text().splitlines()
    assert len(log) == 3 and '"val_loss"' in log[0]


class Crash(Exception):
    pass


class CrashingTrainer(Trainer):
    crash_at = 5

    def optimizer_step(self):
        ok = super().optimizer_step()
        if self.step == self.crash_at:
            raise Crash()
        return ok


def test_interrupted_then_resumed_run_ends_with_identical_weights(tok, tmp_path):
    straight = make_trainer(tok, tmp_path / "a")
    straight.fit()
    crashing = make_trainer(tok, tmp_path / "b", cls=CrashingTrainer)
    with pytest.raises(Crash):
        crashing.fit()                               # dies at step 5; last resume save at step 4
    resumed = make_trainer(tok, tmp_path / "b", resume=True)
    assert resumed.step == 0
    resumed.fit()
    assert resumed.step == straight.step == 12
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
