"""The pace a run reports: the machine's reference figure, the estimate after the first steps."""
import pytest
import torch

import devices
import pace


def test_reference_figure_is_a_measured_matmul_rate_in_fp32_and_the_runs_precision():
    fig = pace.reference_figure(torch.device("cpu"), torch.bfloat16)
    assert set(fig) == {"fp32", "bf16"} and all(v > 0.1 for v in fig.values())
    assert set(pace.reference_figure(torch.device("cpu"), None)) == {"fp32"}


def test_a_busy_moment_slows_both_dtypes_alike_so_auto_still_sees_bf16_faster(monkeypatch):
    """A shared VM busy for five timings in a row (4x slower): timed one dtype after the other, all
    five of bf16's rounds would fall in it and bf16 would look slower than fp32 (--precision auto
    then trains in fp32, twice as slow); taking turns, each dtype keeps a quiet round."""
    calls = []

    def fake_timer(dtype, device):
        def timed():
            calls.append(dtype)
            return {torch.float32: 1.0, torch.bfloat16: 2.5}[dtype] / (4 if 6 <= len(calls) <= 10 else 1)   # GFLOP/s
        return timed
    monkeypatch.setattr(devices, "matmul_timer", fake_timer)
    rates = devices.matmul_rates.__wrapped__(torch.device("cpu"), (torch.float32, torch.bfloat16))
    assert len(calls) == 10 and calls[:2] == [torch.float32, torch.bfloat16]
    assert rates[torch.bfloat16] / rates[torch.float32] == pytest.approx(2.5)


def test_the_estimate_follows_the_timed_steps_and_counts_validation(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(pace.time, "time", lambda: clock[0])
    monkeypatch.setattr(pace, "reference_figure", lambda device, dtype: {"fp32": 50.0})
    p = pace.Pace(total_steps=100, val_batches=60, shown=True)
    p.begin(0, torch.device("cpu"), None)
    assert "本机参考算力" in capsys.readouterr().out
    for step in range(1, 30):
        clock[0] += 5.0 if step <= pace.WARM_STEPS else 0.5       # slow start-up steps, then 0.5 s/step
        p.step_done(step)
    out = capsys.readouterr().out
    # 13 steps took 15 + 5 s; 87 steps and 20 steps' worth of validation remain at 0.5 s
    assert out.count("预计训练用时") == 1 and "预计训练用时 1 分 14 秒" in out and "0.50 秒/步" in out, out
    clock[0] += 45.5                                              # the rest of the run, as estimated
    p.finish()
    assert "训练用时 1 分 14 秒（开始时预计 1 分 14 秒）" in capsys.readouterr().out
