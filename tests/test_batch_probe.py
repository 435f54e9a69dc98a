"""--batch-size auto: the search (doubling, then bisecting) and the CPU probe on a tiny model."""
import pytest

import batch_probe
from batch_probe import largest_fitting, longest_sample, memory_fits, step_bytes
from errors import UserError
from test_trainer import make_trainer


def counting(limit):
    """fits(size) = size <= limit, remembering what was asked: a machine whose memory ends at `limit`."""
    asked = []

    def fits(size):
        asked.append(size)
        return size <= limit
    return fits, asked


def test_doubling_then_bisecting_finds_the_boundary():
    fits, asked = counting(37)
    assert largest_fitting(fits, 64) == 37
    assert asked == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]      # doubled to 64, bisected 32..64
    for limit in range(1, 70):                                        # every boundary, in few tries
        fits, asked = counting(limit)
        assert largest_fitting(fits, 64) == min(limit, 64)
        assert len(asked) <= 13


@pytest.mark.parametrize("cap, expected", [(64, [1, 2, 4, 8, 16, 32, 64]), (48, [1, 2, 4, 8, 16, 32, 48])])
def test_the_cap_ends_the_search_when_everything_fits(cap, expected):
    fits, asked = counting(10 ** 6)
    assert largest_fitting(fits, cap) == cap and asked == expected


def test_nothing_fits_gives_zero():
    fits, asked = counting(0)
    assert largest_fitting(fits, 64) == 0 and asked == [1]


def test_on_a_cpu_the_budget_decides_from_what_the_step_keeps(tok, tmp_path):
    t = make_trainer(tok, tmp_path)
    sample = longest_sample(t)
    need = [step_bytes(t, sample, size) for size in range(1, 7)]
    assert all(a < b for a, b in zip(need, need[1:]))                # more samples, more memory
    assert largest_fitting(memory_fits(t, sample, need[4] - 1), 64) == 4   # 5 would not fit
    assert largest_fitting(memory_fits(t, sample, need[0] - 1), 64) == 0
    assert all(p.grad is None for p in t.model.parameters())          # the probe leaves no gradients


def test_auto_picks_a_batch_and_training_runs_with_it(tok, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(batch_probe.CAPS, "cpu", 16)                  # 48 samples: whole steps even at the cap
    t = make_trainer(tok, tmp_path, batch_size="auto", epochs=1)
    assert isinstance(t.cfg.batch_size, int) and 1 <= t.cfg.batch_size <= 16
    assert "--batch-size auto：每个进程的批次定为" in capsys.readouterr().out
    assert t.steps_per_epoch == 48 // t.cfg.batch_size
    t.fit()
    assert t.step == t.steps_per_epoch


def test_auto_keeps_the_batch_of_the_resume_state(tok, tmp_path, capsys):
    make_trainer(tok, tmp_path, batch_size=4, epochs=1).fit()          # leaves its resume state
    t = make_trainer(tok, tmp_path, batch_size="auto", epochs=2, resume=True)
    assert t.cfg.batch_size == 4 and "断点里记录的批次 4" in capsys.readouterr().out


def test_auto_with_fsdp_is_refused_with_one_line(tok, tmp_path):
    t = make_trainer(tok, tmp_path)
    t.cfg.batch_size, t.cfg.fsdp, t.world = "auto", True, 2            # what a torchrun rank with --fsdp sees
    with pytest.raises(UserError, match="不能和 --fsdp 一起用"):
        batch_probe.resolve_batch(t)
