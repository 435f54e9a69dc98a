"""A small vision-language model, readable top to bottom.

image (B,3,H,W) -> VisionEncoder (SigLIP-shaped ViT) -> patch features (B,N,Dv)
                -> Projector (Linear-GELU-Linear)  -> image embeddings (B,N,D)
prompt ids with N `<image>` tokens -> token embeddings (B,T,D), image rows spliced in
                -> LanguageModel (Llama-shaped decoder) -> next-token logits

The layouts mirror transformers' SiglipVisionModel and LlamaForCausalLM (pre-LN blocks,
rotate-half RoPE, SwiGLU) so a trained model exports to the LLaVA format and to GGUF
(llava_layouts.py). The model knows nothing about files, tokenizers or HTTP: it sees tensors only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import llava_layouts
from images import normalise
from layout import Attention, Targets, at_columns, image_positions, loss_targets, positions_and_mask


@dataclass
class VLMConfig:
    # vision encoder (vit_*)
    vit_image_size: int = 64
    vit_patch_size: int = 8
    vit_dim: int = 192
    vit_layers: int = 4
    vit_heads: int = 3
    vit_mlp_ratio: float = 4.0
    vit_image_mean: tuple = (0.5, 0.5, 0.5)      # preprocessing, kept with the weights
    vit_image_std: tuple = (0.5, 0.5, 0.5)
    # "siglip": patches only, tanh GELU (here and in the projector), as SigLIP and llama.cpp's LLaVA
    # graph compute; "clip": a CLS token and a pre-LayerNorm first, exact GELU (models saved before
    # the field existed; llama.cpp's graph misplaces a CLS token, so those don't export to GGUF)
    vit_layout: str = "siglip"
    # projector (mp_*): Linear(vit_dim, lm_dim) -> GELU -> Linear(lm_dim, lm_dim)
    # language model (lm_*)
    lm_vocab_size: int = 1024
    lm_dim: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 4
    lm_hidden: int = 768
    lm_max_len: int = 512
    lm_rope_theta: float = 10000.0
    lm_norm_eps: float = 1e-5
    # special token ids, filled from the tokenizer
    image_token_id: int = 0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 3

    @property
    def gelu(self) -> str:
        """The ViT's and the projector's GELU: F.gelu's approximate="tanh", or "none" (exact)."""
        return "none" if self.vit_layout == "clip" else "tanh"

    @property
    def image_tokens(self) -> int:
        """How many `<image>` tokens one image becomes (one per patch, CLS dropped)."""
        return (self.vit_image_size // self.vit_patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in {**LEGACY, **d}.items()}
        return cls(**d)


LEGACY = {"vit_layout": "clip"}             # what a saved config without these fields was built as


PRESETS = {
    # smoke tests: seconds per epoch, learns nothing useful
    "micro": dict(vit_image_size=32, vit_patch_size=8, vit_dim=32, vit_layers=1, vit_heads=2,
                  lm_dim=32, lm_layers=1, lm_heads=2, lm_kv_heads=2, lm_hidden=64),
    # One 24-px patch per grid cell keeps the language model's sequence short (9 image tokens):
    # the language model is where a CPU's time goes. tiny: from-scratch runs on CPU (scene_chats);
    # demo: the synthetic demo, 2 layers each: half the time per step of tiny's 4, as accurate
    # (three seeds, docs/training.md).
    "tiny": dict(vit_image_size=72, vit_patch_size=24, lm_heads=8, lm_kv_heads=8, lm_hidden=512),
    "demo": dict(vit_image_size=72, vit_patch_size=24, vit_layers=2, lm_layers=2, lm_heads=8, lm_kv_heads=8,
                 lm_hidden=512),
    # from-scratch run on one GPU
    "small": dict(vit_image_size=224, vit_patch_size=16, vit_dim=384, vit_layers=6, vit_heads=6,
                  lm_vocab_size=8192, lm_dim=512, lm_layers=8, lm_heads=8, lm_kv_heads=8,
                  lm_hidden=1408, lm_max_len=1024),
}


# ----------------------------------------------------------------------------- vision

class VisionBlock(nn.Module):
    """Pre-LN transformer block, CLIP's and SigLIP's layout (LayerNorm, biased q/k/v/out, GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, gelu: str):
        super().__init__()
        self.heads, self.gelu = heads, gelu                  # gelu: "tanh" or "none" (exact)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):                                    # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).unbind(2)
        a = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(a.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.gelu))


class VisionEncoder(nn.Module):
    """ViT: conv patch embedding + learned positions -> blocks; returns every patch's features from
    the last block (LLaVA's "full" strategy). The "clip" layout (cfg.vit_layout) puts a CLS token in
    front and a LayerNorm before the blocks, and drops the CLS at the end ("default" strategy)."""
    source = None               # built here: the weights live only in our checkpoint
    feature_layer = -1

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg, self.has_cls = cfg, cfg.vit_layout == "clip"
        self.patch_embed = nn.Conv2d(3, cfg.vit_dim, cfg.vit_patch_size, cfg.vit_patch_size, bias=False)
        self.pos = nn.Parameter(torch.randn(cfg.image_tokens + self.has_cls, cfg.vit_dim) * 0.02)
        if self.has_cls:
            self.cls = nn.Parameter(torch.randn(cfg.vit_dim) * 0.02)
            self.pre_norm = nn.LayerNorm(cfg.vit_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg.vit_dim, cfg.vit_heads, cfg.vit_mlp_ratio, cfg.gelu)
                                    for _ in range(cfg.vit_layers))

    def forward(self, pixels):                               # pixels: (B, 3, H, W), normalised
        p = self.cfg.vit_patch_size                          # the patch conv as one matmul (faster in bf16)
        patches = pixels.unflatten(2, (-1, p)).unflatten(4, (-1, p)).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        x = F.linear(patches, self.patch_embed.weight.flatten(1))          # (B, N, Dv)
        if self.has_cls:
            x = self.pre_norm(torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + self.pos)
        else:
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return x[:, int(self.has_cls):]                      # (B, N, Dv)

    def llava_vision(self) -> tuple[dict, dict]:
        return llava_layouts.vision(self)


class Projector(nn.Module):
    """LLaVA's mlp2x_gelu: vision width -> LLM width. gelu: "tanh" or "none" (exact)."""

    def __init__(self, vit_dim: int, lm_dim: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(vit_dim, lm_dim)
        self.fc2 = nn.Linear(lm_dim, lm_dim)
        self.gelu = gelu

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


# ----------------------------------------------------------------------------- language

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(max_len: int, head_dim: int, theta: float):
    """cos/sin for every position < max_len: (max_len, head_dim) each, rotate-half layout."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ang = torch.arange(max_len).float()[:, None] * inv           # (max_len, hd/2)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


GROW = 64                                   # KV cache columns added at a time


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attend(q, k, v, **kw):
    """Scaled dot-product attention; under bf16 autocast a CPU computes it in fp32: torch's CPU
    attention is ~3x slower in bf16 (its backward), the matmuls around it much faster (docs/training.md)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class KVCache:
    """Keys/values for every layer: k, v (L, B, H_kv, capacity, hd), columns [0, len) filled;
    rows of different lengths are right-aligned (shorter histories padded on the left). Allocated
    on first use, so it takes the dtype attention runs in; grown by GROW columns when full (the
    server's engine joins rows mid-way, so it can't know the final length)."""

    def __init__(self, shape, k=None, v=None, length=0):
        self.shape, self.k, self.v, self.len = shape, k, v, length

    def update(self, layer: int, k, v):                          # k, v: (B, H_kv, T_new, hd)
        end = self.len + k.shape[2]
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        if end > self.k.shape[3]:
            self.k, self.v = (torch.cat([t, t.new_zeros(*t.shape[:3], end - t.shape[3] + GROW, t.shape[4])], 3)
                              for t in (self.k, self.v))
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def stacked(self):
        """(k, v, length): k, v (L, B, H_kv, >= length, hd) with columns [0, length) filled."""
        return self.k, self.v, self.len

    @classmethod
    def from_stacked(cls, k, v, length: int) -> "KVCache":
        """A cache continuing from stacked() tensors (columns past length are room to grow)."""
        return cls(k.shape, k, v, length)


class DecoderBlock(nn.Module):
    """Llama block: RMSNorm -> attention (RoPE, GQA) -> RMSNorm -> SwiGLU."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.lm_heads, cfg.lm_kv_heads
        self.hd = cfg.lm_dim // cfg.lm_heads
        self.attn_norm = RMSNorm(cfg.lm_dim, cfg.lm_norm_eps)
        self.qkv = nn.Linear(cfg.lm_dim, (cfg.lm_heads + 2 * cfg.lm_kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(cfg.lm_dim, cfg.lm_dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.lm_dim, cfg.lm_norm_eps)
        self.gate_up = nn.Linear(cfg.lm_dim, 2 * cfg.lm_hidden, bias=False)
        self.down = nn.Linear(cfg.lm_hidden, cfg.lm_dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, queries=None):
        """queries (B, Tq): keys/values from all T positions, but outputs only for these columns of
        each row (the training pass needs no more from the last block, see VLM.forward)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(
            [self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
        k = apply_rope(k.view(B, T, self.kv_heads, self.hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        if queries is not None:
            q, x = at_columns(q, queries), at_columns(x, queries)
            cos, sin, mask = (None if t is None else at_columns(t.transpose(1, 2), queries).transpose(1, 2)
                              for t in (cos, sin, mask))
            if mask is None:                                 # plain causal: column c sees keys 0..c
                mask = (queries[:, :, None] >= torch.arange(T, device=x.device))[:, None]
        Tq = q.shape[1]
        q = apply_rope(q.view(B, Tq, self.heads, self.hd).transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # no mask: causal over a fresh prompt; a single new token may see every cached key (a branch,
        # so that under torch.compile a symbolic length becomes a guard, not a SymBool SDPA refuses)
        causal = mask is None and (True if Tq > 1 else False)
        a = attend(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads)
        x = x + self.o(a.transpose(1, 2).reshape(B, Tq, D))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class LanguageModel(nn.Module):
    source = None               # built here: the weights live only in our checkpoint
    packs = True                # takes any (B, 1, T, T) mask: training rows may hold several samples

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.max_len = cfg.lm_max_len                              # the RoPE table ends there
        self.embed = nn.Embedding(cfg.lm_vocab_size, cfg.lm_dim)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.lm_layers))
        self.norm = RMSNorm(cfg.lm_dim, cfg.lm_norm_eps)
        cos, sin = rope_table(cfg.lm_max_len, cfg.lm_dim // cfg.lm_heads, cfg.lm_rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # looked up, not recomputed, per step
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, positions, mask=None, cache: KVCache | None = None, queries=None):
        """x: (B, T, D) embeddings; positions: (B, T); mask: bool (B, 1, T, T_total) or None
        for plain causal attention. Returns final hidden states (B, T, D), or (B, Tq, D) for the
        columns `queries` (B, Tq) of each row only (the last block then skips the rest)."""
        T = x.shape[1]
        cos, sin = self.rope_cos[positions][:, None].to(x.dtype), self.rope_sin[positions][:, None].to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i, queries if i == len(self.blocks) - 1 else None)
        if cache is not None:
            cache.len += T
        return self.norm(x)

    def get_output_embeddings(self) -> nn.Module:
        return self.embed                                          # tied: logits score with the embeddings

    def logits(self, h):
        return F.linear(h, self.embed.weight)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache((self.cfg.lm_layers, batch, self.cfg.lm_kv_heads, max_len, self.cfg.lm_dim // self.cfg.lm_heads))

    def llava_text(self) -> tuple[dict, dict, torch.Tensor]:
        return llava_layouts.text(self)


# ----------------------------------------------------------------------------- the VLM

class VLM(nn.Module):
    """vision and lm default to the modules above. Any module with the same small interface can
    stand in (backbones.py wraps Hugging Face towers and LLMs this way). Given modules keep their weights.
      vision(pixels) -> (B, N, vit_dim); it declares has_cls (a CLS token was dropped), feature_layer,
        source (where pretrained weights come from; None: built here) and llava_vision() for export.
      lm(embeds, positions, mask, cache, queries) -> hidden states; lm.embed(ids), lm.logits(hidden) (scored
        by lm.get_output_embeddings(), the layer whose rows are the vocabulary, as in transformers),
        lm.new_cache(batch, max_len) -> a cache with stacked() / from_stacked() (its keys and values as
        (L, B, H_kv, T, hd) tensors and back: the server's engine joins and cuts rows that way);
        it declares max_len (None: no fixed context), source, packs (whether it honours any mask, so
        training may pack several samples into a row) and llava_text() for export."""

    def __init__(self, cfg: VLMConfig, vision: nn.Module | None = None, lm: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else VisionEncoder(cfg)
        self.projector = Projector(cfg.vit_dim, cfg.lm_dim, cfg.gelu)
        self.lm = lm if lm is not None else LanguageModel(cfg)
        for part, given in ((self.vision, vision), (self.projector, None), (self.lm, lm)):
            if given is None:
                part.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids, pixels=None, image_pos=None):
        """Token embeddings with each run of `<image>` tokens replaced by projected patches.
        The runs take the images in reading order (row by row, left to right), so pixels
        (n_images, 3, H, W), uint8, list each row's images in turn, any number per row (collate.py).
        image_pos: those tokens' flat positions (layout.image_positions), found here if not given."""
        x = self.lm.embed(input_ids)                                 # (B, T, D)
        n_images = 0 if pixels is None else len(pixels)
        if image_pos is None:
            image_pos = image_positions(input_ids, n_images, self.cfg.image_token_id, self.cfg.image_tokens)
        if n_images:
            pixels = normalise(pixels, self.cfg).to(self.projector.fc1.weight.dtype)     # uint8 -> float here
            feats = self.projector(self.vision(pixels))                                   # (B_img, N, D)
            x = x.flatten(0, 1).index_copy(0, image_pos, feats.flatten(0, 1).to(x.dtype)).view_as(x)
        return x

    def forward(self, input_ids, pixels=None, labels=None, attention_mask=None, image_pos=None,
                targets: Targets | None = None, attention: Attention | None = None):
        """Training/scoring pass. labels: (B, T) next-token targets aligned with input_ids,
        -100 where no loss is taken (prompt, image, pad). Returns (loss, logits); with labels
        only the supervised positions' logits are computed (a large saving on image tokens).
        image_pos, targets and attention (layout.py, from the collator) stand for the ids', the
        labels' and attention_mask's layout: given them, the pass has no data-dependent shape and
        never waits for the device."""
        x = self.embed(input_ids, pixels, image_pos)
        positions, mask = attention if attention is not None else positions_and_mask(attention_mask, input_ids.shape)
        if labels is None and targets is None:
            return None, self.lm.logits(self.lm(x, positions.to(x.device), mask))
        queries, index, target = targets if targets is not None else loss_targets(labels)
        # The last decoder block only has to produce the positions whose logits are taken: in the
        # demo's packed rows about 3 in 10 (prompts, images and padding are the rest).
        h = self.lm(x, positions.to(x.device), mask, queries=queries)     # (B, Tq, D)
        logits = self.lm.logits(h.flatten(0, 1)[index])               # (n_supervised, V)
        loss = F.cross_entropy(logits.float(), target, ignore_index=-100)
        return loss, logits

    @torch.inference_mode()                  # ~10% faster per token than no_grad on a CPU (bench/)
    def generate(self, input_ids, pixels=None, attention_mask=None, max_new_tokens=64,
                 temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        """Batched sampling with a KV cache. Prompts must be left-padded (attention_mask 0 on
        the left). temperature 0 = greedy. Each row stops at EOS (or any of stop_ids); finished
        rows emit pad. Yields the next token column (B,) per step, so callers can stream."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stop = torch.tensor(sorted({self.cfg.eos_token_id, *(stop_ids or ())}), device=input_ids.device)
        if self.lm.max_len is not None and T + max_new_tokens > self.lm.max_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.lm.max_len} tokens")
        cache = self.lm.new_cache(B, T + max_new_tokens)
        x = self.embed(input_ids, pixels)
        key_mask = attention_mask.bool()
        positions, mask = positions_and_mask(attention_mask, (B, T))
        h = self.lm(x, positions, mask, cache)
        next_pos = positions[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            tok = sample(self.lm.logits(h[:, -1]).float(), temperature, top_k, top_p, generator)
            tok = torch.where(done, self.cfg.pad_token_id, tok)
            yield tok
            done |= torch.isin(tok, stop)
            if bool(done.all()):
                return
            if mask is not None:                                 # padded rows: hide their pad keys
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], 1)
            h = self.lm(self.lm.embed(tok[:, None]), next_pos[:, None],
                        None if mask is None else key_mask[:, None, None, :], cache)
            next_pos = next_pos + 1


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature < 1e-4:                      # 0 = greedy; a tinier temperature would overflow to inf/NaN
        return logits.argmax(-1)
    logits = logits.float() / temperature       # in fp32: bf16/fp16 logits over a small temperature overflow
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p           # keep the first token always
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
