import pytest
import torch

import probes
import scenes
from collate import Collator
from model import VLM
from optim import lr_at
from trainer import EpochReport, TrainConfig, Trainer
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


def test_flags_come_from_train_config_with_each_scripts_own_defaults():
    import train_vision
    import train_vision_real
    from train_config import config_from_args
    demo = config_from_args(train_vision.build_parser().parse_args([]))
    assert demo == TrainConfig(batch_size=48, epochs=7, lr=1e-3, optimizer="muon", muon_steps=3, keep="last")
    real = config_from_args(train_vision_real.build_parser().parse_args([]))
    assert real == TrainConfig()
    cfg = config_from_args(train_vision.build_parser().parse_args(
        ["--grad-accum", "3", "--compile", "--feature-cache-gb", "0.5", "--checkpoint", "a.pt", "--resume"]))
    assert (cfg.accum, cfg.compile, cfg.feature_cache_gb, cfg.checkpoint, cfg.resume) == (3, True, 0.5, "a.pt", True)


def make_trainer(tok, tmp_path, cls=Trainer, prepare=None, **kw):
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    model = VLM(cfg)
    if prepare is not None:
        prepare(model)
    train = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size)
    val = scenes.SceneDataset(16, "test", 1, "zh", cfg.vit_image_size)
    tc = TrainConfig(**{**dict(epochs=2, batch_size=8, lr=3e-3, output=str(tmp_path / "m.pt"),
                               precision="fp32", save_every=2, workers=0), **kw})
    probe = probes.CellProbe(model.vision, cfg.vit_dim)
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


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_last_saves_the_final_epoch_even_when_its_score_is_not_the_best(tok, tmp_path, capsys, keep):
    from checkpoint import load_checkpoint
    t = make_trainer(tok, tmp_path, epochs=3, keep=keep)
    scores = iter([1.0, 0.5, 0.7])                                  # the last epoch scores worse than the second
    t.on_epoch_end = lambda model, epoch: EpochReport(score=next(scores))
    t.fit()
    _, _, meta = load_checkpoint(tmp_path / "m.pt")
    assert (meta["epoch"], meta["score"]) == ((3, 0.7) if keep == "last" else (2, 0.5)) and t.best == 0.5
    out = capsys.readouterr().out
    assert out.count("→ 新的最佳损失! 保存模型...") == 2 and ("--keep last" in out) == (keep == "last")


class Crash(Exception):
    pass


class CrashingTrainer(Trainer):
    crash_at = 5

    def optimizer_step(self):
        ok = super().optimizer_step()
        if self.step == self.crash_at:
            raise Crash()
        return ok


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_then_resumed_run_ends_with_identical_weights(tok, tmp_path, optimizer):
    straight = make_trainer(tok, tmp_path / "a", optimizer=optimizer)
    straight.fit()
    crashing = make_trainer(tok, tmp_path / "b", cls=CrashingTrainer, optimizer=optimizer)
    with pytest.raises(Crash):
        crashing.fit()                               # dies at step 5; last resume save at step 4
    resumed = make_trainer(tok, tmp_path / "b", resume=True, optimizer=optimizer)
    assert resumed.step == 0
    resumed.fit()
    assert resumed.step == straight.step == 12
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_with_another_optimizer_is_refused_in_one_line(tok, tmp_path):
    from errors import UserError
    crashing = make_trainer(tok, tmp_path, cls=CrashingTrainer, optimizer="muon")
    with pytest.raises(Crash):
        crashing.fit()
    with pytest.raises(UserError, match="--optimizer muon.*这次是 adamw"):
        make_trainer(tok, tmp_path, resume=True, optimizer="adamw").fit()


def test_resume_without_state_trains_from_the_start_with_a_note(tok, tmp_path, capsys):
    again = make_trainer(tok, tmp_path, resume=True, epochs=1)     # a job script that always passes --resume
    again.fit()
    assert "没有找到断点文件" in capsys.readouterr().out and again.step == 6
    assert (tmp_path / "m.pt").is_file() and len((tmp_path / "m.log.jsonl").read_text().splitlines()) == 1


def test_resume_saves_follow_wall_time_in_the_background_and_still_resume_exactly(tok, tmp_path, monkeypatch):
    import checkpoint
    writes, real = [], checkpoint.atomic_save
    def slow_save(obj, path):                                           # a slow disk: steps must not wait
        import threading, time
        if str(path).endswith(".resume.pt"):
            writes.append((obj["step"], threading.current_thread().name))
        time.sleep(0.05)
        real(obj, path)
    monkeypatch.setattr(checkpoint, "atomic_save", slow_save)
    timed = make_trainer(tok, tmp_path / "t", save_every=0, save_minutes=1e-9, epochs=1)   # due after every step
    timed.fit()
    steps = [s for s, _ in writes]
    assert steps == sorted(steps) and len(steps) >= 6                   # every step (and the epoch's end)
    assert all(name == "resume-save" for _, name in writes)            # written off the training thread
    crashing = make_trainer(tok, tmp_path / "c", cls=CrashingTrainer, save_every=0, save_minutes=1e-9, epochs=1)
    with pytest.raises(Crash):
        crashing.fit()
    assert torch.load(tmp_path / "c" / "m.resume.pt", weights_only=True)["step"] == 4  # complete, atomic
    resumed = make_trainer(tok, tmp_path / "c", resume=True, epochs=1)
    resumed.fit()
    for (k, a), (_, b) in zip(timed.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_failed_background_save_stops_training_with_one_clear_message(tok, tmp_path, monkeypatch):
    import checkpoint
    from errors import UserError
    def full_disk(obj, path):
        raise UserError("无法写入检查点：磁盘已满")
    monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
    t = make_trainer(tok, tmp_path, save_every=0, save_minutes=1e-9, epochs=1)
    with pytest.raises(UserError, match="磁盘已满"):
        t.fit()
    assert t.step <= 3                                                   # raised at the next save, not at the end


def projector_only(model):
    from backbones import configure_training
    configure_training(model, "projector", lr=3e-3)


def test_a_frozen_encoder_runs_once_per_image_and_training_is_unchanged(tok, tmp_path):
    """--train projector on a CPU: epoch 2 takes every image's features from memory, and the run
    ends with the same weights as one that recomputes them (budget 0 = no cache)."""
    runs = {}
    for budget in (0.0, 1.0):
        t = make_trainer(tok, tmp_path / str(budget), prepare=projector_only, epochs=2, feature_cache_gb=budget)
        tower, calls = t.model.vision, []                       # images the encoder really processed
        original = tower.forward
        tower.forward = lambda px: (calls.append(len(px)), original(px))[1]
        t.fit()
        del tower.forward
        assert t.model.vision is tower                         # the model holds the bare tower again
        runs[budget] = (t, sum(calls))
    (plain, plain_calls), (cached, cached_calls) = runs[0.0], runs[1.0]
    assert plain.feature_cache is None and cached.feature_cache is not None
    assert cached_calls == 48 + 16                # 48 training + 16 validation images, once each
    assert plain_calls >= 2 * (48 + 16)           # without the cache: every epoch again
    assert cached.feature_cache.hits >= 48 + 16
    for a, b in zip(plain.model.projector.parameters(), cached.model.projector.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert not cached.feature_cache.store                      # memory given back after fit()


def test_a_cache_that_does_not_fit_keeps_what_fits_and_recomputes_the_rest(tok, tmp_path):
    from feature_cache import CachedTower
    t = make_trainer(tok, tmp_path, prepare=projector_only, feature_cache_gb=0)
    size = t.model.cfg.vit_image_size
    px = torch.randn(4, 3, size, size)
    with torch.no_grad():
        one = t.model.vision(px[:1]).nbytes
        cache = CachedTower(t.model.vision, budget=2.5 * one)
        first = cache(px)
        assert len(cache.store) == 2 and cache.full
        again = cache(torch.cat([px, px[:1]]))                 # a repeated image is encoded once
    assert cache.hits == 2 + 1 and cache.misses == 4 + 2
    assert torch.allclose(again[:4], first, atol=1e-6) and torch.equal(again[4], again[0])
    assert torch.allclose(first, t.model.vision(px), atol=1e-6)   # the same features as the tower's own


def test_the_cache_shows_watchers_of_the_tower_every_whole_batch(tok, tmp_path):
    """A forward hook on the tower (probes.CellProbe reads features this way) sees the whole
    batch's features, also when all of them came from memory."""
    from feature_cache import CachedTower
    t = make_trainer(tok, tmp_path, prepare=projector_only, feature_cache_gb=0)
    size = t.model.cfg.vit_image_size
    px = torch.randn(3, 3, size, size)
    seen = []
    t.model.vision.register_forward_hook(lambda m, args, out: seen.append(out))
    cache = CachedTower(t.model.vision, budget=2 ** 30)
    with torch.no_grad():
        first, again = cache(px), cache(px)
    assert cache.hits == 3 and len(seen) == 2
    assert seen[0] is first and seen[1] is again and again.shape == (3, *first.shape[1:])
