"""Peak memory of the two steps that touch every frozen weight: casting a memory-mapped base to
bf16 (devices.store_frozen_in) and fingerprinting it for a delta checkpoint (checkpoint.fingerprint).
Peaks are this process's VmHWM, reset just before the step (Linux)."""
from pathlib import Path

import torch

MB = 2 ** 20


def kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_during(step) -> float:
    """Bytes the resident set rose above where it was, at its highest while `step()` ran."""
    Path("/proc/self/clear_refs").write_text("5")                  # VmHWM := VmRSS
    before = kib("VmRSS")
    step()
    return kib("VmHWM") - before


def test_casting_a_memory_mapped_base_never_holds_its_whole_file(tmp_path):
    """transformers maps the safetensors file; the cast reads every weight. Held until the end,
    the file's pages (84 MB here) and the bf16 copy (42 MB) were resident together."""
    import backbones
    import tiny_hf
    from devices import store_frozen_in
    from safetensors.torch import load_file
    path = tiny_hf.save_llama(tmp_path / "llm", hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=8)
    lm, _ = backbones.load_causal_lm(str(path))
    lm.requires_grad_(False)
    file_bytes = (path / "model.safetensors").stat().st_size
    assert file_bytes > 80 * MB
    peak = peak_during(lambda: store_frozen_in(lm, torch.bfloat16))
    assert peak < file_bytes * 0.75, f"{peak / MB:.0f} MB"
    stored = load_file(path / "model.safetensors")
    for name, p in lm.hf_model.named_parameters():                 # embeddings: one row more, <image>
        want = stored[name].to(torch.bfloat16) if p.ndim >= 2 else stored[name]
        assert p.dtype == want.dtype and torch.equal(p[:len(want)], want), name


def test_a_fingerprint_is_summed_in_pieces_never_as_one_float64_copy():
    from checkpoint import fingerprint
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096, bias=False)               # 64 MB; a float64 copy: 128 MB
    value = []
    peak = peak_during(lambda: value.append(fingerprint(model, {"weight"}, torch.bfloat16)))
    assert peak < 32 * MB, f"{peak / MB:.0f} MB"
    whole = float(model.weight.detach().to(torch.bfloat16).sum(dtype=torch.float64))
    assert abs(value[0] - whole) <= 1e-9 * model.weight.numel()
