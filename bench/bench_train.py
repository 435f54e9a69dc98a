"""训练吞吐基准：本项目的 VLM 与 transformers 的 LlavaForConditionalGeneration，同尺寸、同精度、同一进程内交替测量。

    .venv/bin/python bench/bench_train.py
    .venv/bin/python bench/bench_train.py --precision bf16 --batch 16

Both models are built from configs with random weights (nothing is downloaded); the transformers
model gets a copy of our weights, so the first losses must agree — a check that both really are
the same network. Model FLOPs are counted once (our algorithm: logits only where a label is) and
used for both, so MFU differences are throughput differences. MFU is against a plain matmul of
the same precision measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devices import matmul_rate  # noqa: E402
from model import VLM, VLMConfig  # noqa: E402

# The sizes: 64 px / patch 8 / width 128 / 4 layers vision; width 256 / 4 layers / vocab 4096 LLM.
BENCH_SIZES = dict(vit_image_size=64, vit_patch_size=8, vit_dim=128, vit_layers=4, vit_heads=4,
                   lm_vocab_size=4096, lm_dim=256, lm_layers=4, lm_heads=4, lm_kv_heads=4, lm_hidden=768,
                   lm_max_len=512, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PROMPT, ANSWER = 8, 24          # text tokens before the image / supervised answer tokens per row


def hf_llava(cfg: VLMConfig):
    """transformers' LLaVA with the same shapes as `cfg` (CLIP vision tower + Llama LM, tied head)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=cfg.vit_dim, intermediate_size=int(cfg.vit_dim * cfg.vit_mlp_ratio),
                              num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                              image_size=cfg.vit_image_size, patch_size=cfg.vit_patch_size, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=cfg.lm_vocab_size, hidden_size=cfg.lm_dim, intermediate_size=cfg.lm_hidden,
                       num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                       num_key_value_heads=cfg.lm_kv_heads, max_position_embeddings=cfg.lm_max_len,
                       rms_norm_eps=cfg.lm_norm_eps, rope_theta=cfg.lm_rope_theta, tie_word_embeddings=True,
                       bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


@torch.no_grad()
def copy_weights_to_hf(ours: VLM, hf):
    """Our fused layouts -> transformers' separate projections (same numbers, same network)."""
    c = ours.cfg
    hm = hf.model
    vt = getattr(hm.vision_tower, "vision_model", hm.vision_tower)   # transformers 4 nests it
    ve = vt.embeddings
    ve.patch_embedding.weight.copy_(ours.vision.patch_embed.weight)
    ve.class_embedding.copy_(ours.vision.cls)
    ve.position_embedding.weight.copy_(ours.vision.pos)
    vt.pre_layrnorm.load_state_dict(ours.vision.pre_norm.state_dict())
    for mine, theirs in zip(ours.vision.blocks, vt.encoder.layers):
        a = theirs.self_attn
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), mine.qkv.weight.chunk(3), mine.qkv.bias.chunk(3)):
            getattr(a, name).weight.copy_(w)
            getattr(a, name).bias.copy_(b)
        a.out_proj.load_state_dict(mine.out.state_dict())
        theirs.layer_norm1.load_state_dict(mine.norm1.state_dict())
        theirs.layer_norm2.load_state_dict(mine.norm2.state_dict())
        theirs.mlp.fc1.load_state_dict(mine.fc1.state_dict())
        theirs.mlp.fc2.load_state_dict(mine.fc2.state_dict())
    hm.multi_modal_projector.linear_1.load_state_dict(ours.projector.fc1.state_dict())
    hm.multi_modal_projector.linear_2.load_state_dict(ours.projector.fc2.state_dict())
    lm = hm.language_model
    lm.embed_tokens.weight.copy_(ours.lm.embed.weight)
    hd = c.lm_dim // c.lm_heads
    for mine, theirs in zip(ours.lm.blocks, lm.layers):
        q, k, v = mine.qkv.weight.split([c.lm_heads * hd, c.lm_kv_heads * hd, c.lm_kv_heads * hd])
        theirs.self_attn.q_proj.weight.copy_(q)
        theirs.self_attn.k_proj.weight.copy_(k)
        theirs.self_attn.v_proj.weight.copy_(v)
        theirs.self_attn.o_proj.weight.copy_(mine.o.weight)
        gate, up = mine.gate_up.weight.chunk(2)
        theirs.mlp.gate_proj.weight.copy_(gate)
        theirs.mlp.up_proj.weight.copy_(up)
        theirs.mlp.down_proj.weight.copy_(mine.down.weight)
        theirs.input_layernorm.weight.copy_(mine.attn_norm.weight)
        theirs.post_attention_layernorm.weight.copy_(mine.mlp_norm.weight)
    lm.norm.weight.copy_(ours.lm.norm.weight)
    if hf.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr():
        hf.lm_head.weight.copy_(ours.lm.embed.weight)


def build_pair(sizes: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = VLMConfig(**sizes, vit_layout="clip")        # the layout hf_llava's CLIP tower has (the figures since the start)
    ours, hf = VLM(cfg), hf_llava(cfg)
    copy_weights_to_hf(ours, hf)
    return ours, hf


def make_batch(cfg: VLMConfig, batch: int, seed: int = 0):
    """[bos, prompt…, <image>×N, answer…] with labels on the answer only; no padding."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.image_tokens
    text = lambda k: torch.randint(16, cfg.lm_vocab_size, (batch, k), generator=g)
    ids = torch.cat([torch.full((batch, 1), cfg.bos_token_id), text(PROMPT - 1),
                     torch.full((batch, n), cfg.image_token_id), text(ANSWER)], 1)
    labels = ids.clone()
    labels[:, :PROMPT + n] = -100
    pixels = torch.randn(batch, 3, cfg.vit_image_size, cfg.vit_image_size, generator=g)
    return ids, pixels, labels


def train_flops_per_sample(cfg: VLMConfig, seq: int, supervised: int, passes=(3, 3, 3)) -> float:
    """Forward matmul FLOPs x 3 (backward = 2x forward). Attention scores count the full square
    (vision) and the causal half (LM); logits only on supervised positions. passes: the multiple
    of the forward for (vision, projector, LM): 3 trains, 2 frozen on the gradient's way (the
    backward to its input only), 1 frozen before anything that trains."""
    n, dv, d = cfg.image_tokens + 1, cfg.vit_dim, cfg.lm_dim
    hd, mlp = d // cfg.lm_heads, int(dv * cfg.vit_mlp_ratio)
    vision = 2 * (n - 1) * 3 * cfg.vit_patch_size ** 2 * dv
    vision += cfg.vit_layers * (2 * n * (4 * dv * dv + 2 * dv * mlp) + 4 * n * n * dv)
    projector = 2 * (n - 1) * (dv * d + d * d)
    per_layer = 2 * seq * (d * (cfg.lm_heads + 2 * cfg.lm_kv_heads) * hd + d * d + 3 * d * cfg.lm_hidden)
    per_layer += 2 * seq * seq * d                                      # causal QK^T + AV
    lm = cfg.lm_layers * per_layer + 2 * supervised * d * cfg.lm_vocab_size
    return float(passes[0] * vision + passes[1] * projector + passes[2] * lm)


def matmul_peak(dtype, device, n=1024, reps=8) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device` (the MFU denominator)."""
    return matmul_rate(dtype, device, n, reps, m=n) * 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def ours_step(model, opt, batch, device, dtype):
    ids, pixels, labels = batch
    with autocast(device, dtype):
        loss, _ = model(ids, pixels, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def hf_step(model, opt, batch, device, dtype):
    ids, pixels, labels = batch
    with autocast(device, dtype):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type in ("cpu", "cuda"))


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_memory(which: str, sizes: dict, batch: int, device: str, dtype) -> float:
    """Peak memory of three training steps in MiB: on CUDA the allocator's peak; on a CPU the
    rise of the resident-set high-water mark over the resident set after building the model
    (activations + gradients + optimizer state; run in a fresh process so nothing is reused)."""
    ours, hf = build_pair(sizes)
    model = (ours if which == "ours" else hf).to(device).train()
    del ours, hf
    opt = optimizer(model, device)
    step = ours_step if which == "ours" else hf_step
    data = tuple(t.to(device) for t in make_batch(VLMConfig(**sizes), batch))
    return peak_mib(lambda: [step(model, opt, data, device, dtype) for _ in range(3)], device)


def peak_mib(run, device: str) -> float:
    """Memory run() takes beyond what is held before it, in MiB: the CUDA allocator's peak, or on
    a CPU the rise of the resident-set high-water mark (call it in a fresh process)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")                        # reset VmHWM
    base = rss_kib("VmRSS")
    run()
    return (rss_kib("VmHWM") - base) / 1024


def memory_in_child(which, args) -> float:
    cmd = [sys.executable, __file__, "--memory-child", which, "--batch", str(args.batch),
           "--precision", args.precision, "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(args):
    device, dtype = args.device, PRECISIONS[args.precision]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ours, hf = build_pair(BENCH_SIZES)
    cfg = ours.cfg
    ours, hf = ours.to(device).train(), hf.to(device).train()
    batch = tuple(t.to(device) for t in make_batch(cfg, args.batch))
    seq = batch[0].shape[1]

    # same network: the first losses agree before any step is taken
    with torch.no_grad(), autocast(device, dtype):
        l_ours = float(ours(*batch)[0])
        l_hf = float(hf(input_ids=batch[0], pixel_values=batch[1], labels=batch[2]).loss)
    if abs(l_ours - l_hf) > (1e-3 if dtype is None else 5e-2):
        raise SystemExit(f"两个模型的初始损失不一致：{l_ours:.5f} vs {l_hf:.5f}（权重映射有误）")

    runners = {"ours": (ours, optimizer(ours, device), ours_step),
               "transformers": (hf, optimizer(hf, device), hf_step)}
    compiled = {}
    if args.compile:                # separate copies, so the eager rows keep their own weights
        compiled["ours+compile"] = (copy.deepcopy(ours), ours_step)
    if args.hf_compile:
        compiled["transformers+compile"] = (copy.deepcopy(hf), hf_step)
    compile_s = {}
    for name, (model, step) in compiled.items():
        opt, t = optimizer(model, device), time.perf_counter()
        fn = torch.compile(model)
        step(fn, opt, batch, device, dtype)
        compile_s[name] = round(time.perf_counter() - t, 1)
        runners[name] = (fn, opt, step)
    for model, opt, step in runners.values():                       # warm-up (allocator, kernels)
        for _ in range(2):
            step(model, opt, batch, device, dtype)
    rates = {k: [] for k in runners}
    cpu_rates = {k: [] for k in runners}
    for _ in range(args.rounds):                                    # interleaved: noise hits both
        for name, (model, opt, step) in runners.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = step(model, opt, batch, device, dtype)
            float(loss.detach())
            sync(device)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t))
            cpu_rates[name].append(args.batch * args.steps / (time.process_time() - c))
    peak = matmul_peak(dtype or torch.float32, device)
    flops = train_flops_per_sample(cfg, seq, ANSWER)
    result = {"device": device, "precision": args.precision, "threads": torch.get_num_threads(),
              "batch": args.batch, "seq_len": seq, "initial_loss": [round(l_ours, 4), round(l_hf, 4)],
              "matmul_tflops": round(peak / 1e12, 3), "model_gflop_per_sample": round(flops / 1e9, 3)}
    for name in runners:
        med = statistics.median(rates[name])
        result[name] = {"samples_per_s": round(med, 1), "all_rounds": [round(r, 1) for r in rates[name]],
                        "mfu": round(med * flops / peak, 4),
                        "samples_per_cpu_s": round(statistics.median(cpu_rates[name]), 1)}
        if name in compile_s:
            result[name]["compile_s"] = compile_s[name]
    if not args.no_memory:
        for name, which in (("ours", "ours"), ("transformers", "hf")):
            result[name]["peak_mib"] = round(memory_in_child(which, args), 1)
    base = result["transformers"]["samples_per_s"]
    # What 100% MFU would give: our FLOPs per sample at the matmul speed measured above. No
    # implementation of this network can train faster here, so this caps the attainable ratio.
    result["ceiling"] = {"max_samples_per_s": round(peak / flops, 1), "vs_transformers": round(peak / flops / base, 2)}
    result["speedup"] = {name: round(result[name]["samples_per_s"] / base, 2) for name in runners if name != "transformers"}
    base = result["transformers"]["samples_per_cpu_s"]
    result["speedup_cpu_time"] = {name: round(result[name]["samples_per_cpu_s"] / base, 2)
                                  for name in runners if name != "transformers"}
    return result


def report(r):
    print(f"训练吞吐（{r['device']}，{r['precision']}，{r['threads']} 线程，batch {r['batch']}，序列长 {r['seq_len']}）")
    print(f"  初始损失 本项目 {r['initial_loss'][0]} / transformers {r['initial_loss'][1]}（同一组权重）")
    print(f"  同精度 matmul 峰值 {r['matmul_tflops']} TFLOP/s；模型每样本 {r['model_gflop_per_sample']} GFLOP")
    for name in [k for k in r if isinstance(r[k], dict) and "samples_per_s" in r[k]]:
        m = r[name]
        mem = f"，峰值内存 {m['peak_mib']} MiB" if "peak_mib" in m else ""
        comp = f"，编译 {m['compile_s']} s" if "compile_s" in m else ""
        print(f"  {name:>20}: {m['samples_per_s']:8.1f} 样本/秒（每 CPU 秒 {m['samples_per_cpu_s']:.1f}）  MFU {m['mfu']:.1%}"
              f"{mem}{comp}  各轮 {m['all_rounds']}")
    c = r["ceiling"]
    print(f"  上限：本项目每样本的 FLOPs 全按上面实测的矩阵乘法峰值算（MFU 100%），最多 {c['max_samples_per_s']} 样本/秒，"
          f"即 transformers 的 {c['vs_transformers']:.2f}×")
    for name, x in r["speedup"].items():
        print(f"  加速比 {name} / transformers = {x:.2f}×（按墙钟时间），{r['speedup_cpu_time'][name]:.2f}×（按本进程 CPU 时间）")


def main(argv=None):
    p = argparse.ArgumentParser(description="训练吞吐：本项目 vs transformers LLaVA（同尺寸、同精度）。")
    p.add_argument("--batch", type=int, default=32, help="批次大小 (默认: 32)")
    p.add_argument("--steps", type=int, default=5, help="每轮计时的训练步数 (默认: 5)")
    p.add_argument("--rounds", type=int, default=3, help="交替测量的轮数，取中位数 (默认: 3)")
    common_flags(p)
    p.add_argument("--no-memory", action="store_true", help="不测峰值内存（省去两个子进程）")
    p.add_argument("--compile", action="store_true", help="另测 torch.compile 后的本项目模型")
    p.add_argument("--hf-compile", action="store_true", help="另测 torch.compile 后的 transformers 模型")
    p.add_argument("--json", action="store_true", help="只输出 JSON")
    p.add_argument("--out", help="另把结果存成 JSON 文件")
    p.add_argument("--memory-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        peak = measure_memory(args.memory_child, BENCH_SIZES, args.batch, args.device, PRECISIONS[args.precision])
        print(json.dumps({"peak_mib": peak}))
        return
    emit(run(args), args, report)


def common_flags(p: argparse.ArgumentParser):
    """Flags every side-by-side bench takes (precision, device, threads)."""
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="两者共用的精度 (默认: fp32)")
    p.add_argument("--device", default="cpu", help="设备 (默认: cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU 线程数，0 = torch 默认")


def emit(r: dict, args, report):
    """Print the result (a table, or JSON with --json) and save it with --out."""
    print(json.dumps(r, ensure_ascii=False)) if args.json else report(r)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
