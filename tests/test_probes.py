"""probes.py: the auxiliary targets that help a from-scratch ViT learn to see (PixelProbe for real
pictures; the silhouettes CellProbe predicts on the demo's scenes, tested with it in test_scenes.py)."""
import torch

import probes
from model import PRESETS, VLM, VLMConfig


def tiny_model():
    torch.manual_seed(0)
    return VLM(VLMConfig(**{**PRESETS["micro"], "vit_image_size": 48, "vit_patch_size": 16}))


def test_each_patch_gets_its_own_pixels_pooled():
    model = tiny_model()
    probe = probes.for_model(model)
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
    probe = probes.for_model(model)
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
    assert probes.for_model(model) is None


def test_silhouettes_are_colour_blind_and_pooled_per_patch():
    """A yellow and a blue cross drawn alike have one silhouette (1 on the shape, 0 on the
    background), and so has either with its colour channels swapped, as the probe's second look."""
    from PIL import Image, ImageDraw

    def cross(colour):
        img = Image.new("RGB", (48, 48), (205, 200, 210))
        d = ImageDraw.Draw(img)
        d.rectangle([18, 4, 28, 44], fill=colour)
        d.rectangle([4, 18, 44, 28], fill=colour)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(48, 48, 3).permute(2, 0, 1)
    pixels = torch.stack([cross((235, 200, 25)), cross((35, 75, 220))])
    s = probes.silhouettes(pixels)
    assert s.shape == (2, 1, 48, 48) and set(s.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(s[0], s[1]) and s[0, 0, 20, 6] == 1 and s[0, 0, 6, 6] == 0
    assert torch.equal(probes.silhouettes(pixels[:, [2, 0, 1]]), s)
    patches = probes.per_patch(s, 3, 4)                 # (2, 9, 16): the cross covers the centre patch
    assert patches.shape == (2, 9, 16) and patches[0, 4].min() > 0 and patches[0, [0, 2, 6, 8]].max() == 0
