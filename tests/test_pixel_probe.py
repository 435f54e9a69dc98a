"""PixelProbe: the label-free target that helps a from-scratch ViT learn to see real pictures."""
import torch

import pixel_probe
from model import PRESETS, VLM, VLMConfig


def tiny_model():
    torch.manual_seed(0)
    return VLM(VLMConfig(**{**PRESETS["micro"], "vit_image_size": 48, "vit_patch_size": 16}))


def test_each_patch_gets_its_own_pixels_pooled():
    model = tiny_model()
    probe = pixel_probe.for_model(model)
    pixels = -torch.ones(2, 3, 48, 48)
    pixels[0, 0, :16, 16:32] = 1.0                    # image 0: a red patch at row 0, column 1
    pixels[1, 2, 32:, 32:] = 1.0                      # image 1: a blue patch at the bottom right
    t = probe.targets(pixels)                         # (2, 9, 3 * 8 * 8)
    assert t.shape == (2, 9, 192)
    per_channel = t.reshape(2, 9, 3, 64).mean(-1)
    expected = -torch.ones(2, 9, 3)
    expected[0, 1, 0] = 1.0
    expected[1, 8, 2] = 1.0
    assert torch.equal(per_channel, expected)


def test_the_probe_trains_the_encoder_and_only_when_it_should():
    model = tiny_model()
    probe = pixel_probe.for_model(model)
    model.train()
    pixels = torch.rand(4, 3, 48, 48) * 2 - 1
    params = list(model.vision.parameters()) + list(probe.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(30):
        model.vision(pixels)
        loss = probe({"pixels": pixels})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]              # the features come to carry each patch's pixels
    assert probe({"pixels": None}).item() == 0.0     # a text-only batch adds nothing
    for p in model.vision.parameters():              # a frozen encoder gets no probe
        p.requires_grad_(False)
    assert pixel_probe.for_model(model) is None
