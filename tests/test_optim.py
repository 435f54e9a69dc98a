"""optim.py: our batched Muon against torch.optim.Muon, its skipped steps, which parameters it
takes, and a tiny training run with it."""
import copy

import pytest
import torch
from torch import nn

from errors import UserError
from model import VLM
from optim import Muon, Optimizers, build_optimizer, hidden_matrices
from train_config import TrainConfig
from conftest import tiny_config

SHAPES = [(48, 16), (16, 48), (16, 48), (32, 32), (24, 40)]     # a tall one shares the wide ones' batch


def matrices(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_batched_muon_takes_torch_muons_steps():
    ours, theirs = matrices(), matrices()
    a = Muon(ours, lr=0.02)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for step in range(4):
        set_grads(ours, step), set_grads(theirs, step)
        a.step(), b.step()
    for p, q, s in zip(ours, theirs, start):
        moved = (q - s).norm()
        assert moved > 0.05                                           # the steps are not negligible
        assert (p - q).norm() < 0.005 * moved, (p - q).norm() / moved  # batched bf16 rounding only
        assert torch.allclose(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], atol=1e-6)


def test_a_non_finite_step_changes_neither_weights_nor_momentum():
    params = matrices()
    opt = Muon(params, lr=0.02)
    set_grads(params, 0)
    opt.step()
    before = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in params]
    set_grads(params, 1)
    params[1].grad[0, 0] = float("nan")
    opt.found_inf = torch.ones(())
    opt.step()
    for p, (w, m) in zip(params, before):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
    opt.found_inf = torch.zeros(())
    set_grads(params, 1)
    same = [p.detach().clone() for p in params]
    twin = Muon(same, lr=0.02)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, same):
        q.grad = p.grad * 1024
    twin.grad_scale, twin.found_inf = torch.full((), 1024.0), torch.zeros(())   # fp16 GradScaler's hand-over
    opt.step(), twin.step()
    assert all(not torch.equal(p, w) for p, (w, _) in zip(params, before))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, same))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tok):
    model = VLM(tiny_config(tok))
    hidden = {id(p) for p in hidden_matrices(model)}
    names = {n for n, p in model.named_parameters() if id(p) in hidden}
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names == linear and any(n.startswith("projector.") for n in names)
    assert not any("embed" in n or n.endswith(".pos") or "norm" in n for n in names)

    opt = build_optimizer("muon", model, None, 1e-3, 0.0, torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    adamw, muon = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_muon == hidden and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters() if p.requires_grad}


def test_muon_with_fsdp_or_without_matrices_is_refused_in_one_line(tok):
    with pytest.raises(UserError, match="--fsdp 不能和 --optimizer muon"):
        TrainConfig(fsdp=True, optimizer="muon").validate()
    model = VLM(tiny_config(tok))
    model.requires_grad_(False)
    model.lm.norm.weight.requires_grad_(True)
    with pytest.raises(UserError, match="--optimizer adamw"):
        build_optimizer("muon", model, None, 1e-3, 0.0, torch.device("cpu"))


def test_a_tiny_run_with_muon_lowers_the_loss(tok, tmp_path):
    from test_trainer import make_trainer
    t = make_trainer(tok, tmp_path, epochs=3, optimizer="muon")
    before = t.evaluate_loss(t.val_data)
    t.fit()
    assert t.evaluate_loss(t.val_data) < before - 1.0
    assert t.nonfinite.read() == (0, 0)
