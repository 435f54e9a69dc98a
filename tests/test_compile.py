"""The training step has no host sync: torch.compile(fullgraph=True), which raises on any graph
break, traces forward, loss and backward as one graph, for the built-in model and for Hugging
Face backbones (CLIP + Llama, with LoRA through peft); an epoch of batches of varying lengths
compiles it once or twice, not once per length. Dynamo's "eager" backend runs the traced graphs
as they are (inductor would only add minutes of code generation on a CPU; the graph-break proof
is the same)."""
import pytest
import torch

import backbones
import probes
import scenes
import tiny_hf
from collate import Collator
from model import VLM
from train_step import TrainStep, compile_step, forward_backward
from trainer import TrainConfig, Trainer
from conftest import tiny_config

MAX_COMPILES = 2          # fewer than the distinct lengths each test checks it sees


class Counting:
    """A dynamo backend that counts the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def scene_batches(tok, cfg, n_batches, batch=4):
    data = scenes.SceneDataset(n_batches * batch, "train", 0, "zh", cfg.vit_image_size)
    collate = Collator(tok, cfg)
    return [collate([data[i] for i in range(j, j + batch)]) for j in range(0, n_batches * batch, batch)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compiles_like_eager(model, batches):
    """Each batch through the compiled step (fullgraph) and through plain eager: the same loss and
    gradients. Returns how many graphs dynamo compiled over all of them."""
    backend, net = Counting(), TrainStep(model, None, 1.0)
    step = compile_step(backend=backend)
    for b in batches:
        model.zero_grad(set_to_none=True)
        eager_loss = forward_backward(net, b, 0.5)
        eager = grads(model)
        model.zero_grad(set_to_none=True)
        loss = step(net, b, 0.5)
        torch.testing.assert_close(loss, eager_loss)
        got = grads(model)
        assert got.keys() == eager.keys() and got
        for name in got:
            torch.testing.assert_close(got[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)
    return backend.graphs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles (and stays clear of dynamo's per-function recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_hf_backbone_step_is_one_graph_and_compiles_a_few_times(tmp_path):
    """A CLIP tower and a Llama with LoRA adapters (peft): vision, projector and adapters train."""
    clip, llama = tiny_hf.save_clip(tmp_path / "clip"), tiny_hf.save_llama(tmp_path / "llama")
    model, tok = backbones.build_vlm(str(clip), str(llama))
    backbones.configure_training(model, "lora", 1e-3, lora_r=4)
    batches = scene_batches(tok, model.cfg, 6)
    assert len({b["input_ids"].shape[1] for b in batches}) >= 4                 # lengths really vary
    assert len({len(b["targets"].index) for b in batches}) >= 4
    assert compiles_like_eager(model, batches) <= MAX_COMPILES


class CompiledTrainer(Trainer):
    """--compile's step (whole: fullgraph=True) with the counting backend; records the lengths seen."""
    backend, lengths, rows = None, set(), set()

    def training_step(self):
        net = super().training_step()
        assert self.forward_backward.__wrapped__ is forward_backward          # --compile: the compiled step
        self.forward_backward = compile_step(backend=self.backend)
        return net

    def train_batch(self, batch, sync):
        self.lengths.add(batch["input_ids"].shape[1])
        self.rows.add(batch["input_ids"].shape[0])
        return super().train_batch(batch, sync)


def test_trainer_compile_trains_as_eager_does(tok, tmp_path):
    """--compile through the trainer, the built-in model with the demo's auxiliary probe and packed
    rows: an epoch of batches of varying lengths and row counts compiles a few times and ends with
    the eager run's weights."""
    runs = {}
    for name, cls in (("eager", Trainer), ("compiled", CompiledTrainer)):
        torch.manual_seed(0)
        cfg = tiny_config(tok)
        model = VLM(cfg)
        train = scenes.SceneDataset(48, "train", 0, "zh", cfg.vit_image_size)
        tc = TrainConfig(epochs=1, batch_size=8, lr=3e-3, output=str(tmp_path / name / "m.pt"), precision="fp32",
                         workers=0, compile=name == "compiled")
        CompiledTrainer.backend = Counting()
        t = cls(model, tok, train, Collator(tok, cfg, pack=model.lm.packs), tc, aux=probes.CellProbe(model.vision, cfg.vit_dim),
                log=lambda *a: None)
        t.fit()
        runs[name] = model.state_dict()
    assert len(CompiledTrainer.lengths) >= 4 and 1 <= CompiledTrainer.backend.graphs <= MAX_COMPILES
    assert len(CompiledTrainer.rows) >= 2 and max(CompiledTrainer.rows) < 8           # packed: fewer rows than samples
    for k, v in runs["eager"].items():
        torch.testing.assert_close(runs["compiled"][k], v, rtol=1e-3, atol=1e-4, msg=k)
