"""Pretrained backbones from Hugging Face: a CLIP / SigLIP / SigLIP2 vision tower and an existing
causal LM (Llama, Qwen2, SmolLM2 ...) with its own tokenizer and chat template.

Both are wrapped to the small interface VLM expects (model.py), declared capabilities included, so Collator,
generate, serve, export and checkpoints need no changes: HFVisionTower(pixels) -> (B, N, Dv), one layer's hidden
states, CLS dropped; HFLanguageModel(x, pos, mask, cache) -> (B, T, D), .embed(ids), .logits(h), .new_cache(...).
A family of vision towers (CLIP, SigLIP, ...) is one row of VISION_FAMILIES. This module also
decides what trains (projector / vision+projector / lora / all, with separate learning rates).
transformers and peft are imported inside functions: the built-in model never pays for them.
"""
from __future__ import annotations

import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from errors import UserError
from layout import at_columns
from model import VLM, VLMConfig
from tokenizer import IMAGE, ChatTemplateTokenizer

# --train choice -> (the parts whose own weights train, LoRA adapters on the LLM); "projector" is
# LLaVA stage 1, "projector+lm" / "projector+lora" its stage 2 (docs/training.md)
TRAINS = {"projector": ({"projector"}, False), "vision+projector": ({"vision", "projector"}, False),
          "lora": ({"vision", "projector"}, True), "all": ({"vision", "projector", "lm"}, False),
          "projector+lm": ({"projector", "lm"}, False), "projector+lora": ({"projector"}, True)}
TRAIN_CHOICES = tuple(TRAINS)


@dataclass(frozen=True)
class VisionFamily:
    """What a family of transformers vision towers is, for HFVisionTower and the LLaVA export."""
    model_class: str            # the transformers class that loads it
    has_cls: bool               # a CLS token before the patches: dropped (LLaVA's "default" strategy)
    mean_std: tuple             # preprocessing when the tower's folder has no preprocessor_config.json
    naflex: bool = False        # SigLIP2's NaFlex: takes patch rows, not images; no LLaVA export


HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# model_type in the tower's config.json, less any "_vision_model" -> its family
VISION_FAMILIES = {
    "clip": VisionFamily("CLIPVisionModel", True, ((0.48145466, 0.4578275, 0.40821073),
                                                   (0.26862954, 0.26130258, 0.27577711))),
    "siglip": VisionFamily("SiglipVisionModel", False, HALF),
    "siglip2": VisionFamily("Siglip2VisionModel", False, HALF, naflex=True),
}


def vision_family(model_type: str) -> VisionFamily | None:
    return VISION_FAMILIES.get(model_type.removesuffix("_vision_model"))


# ----------------------------------------------------------------------------- loading

def quiet_transformers():
    """Users see our messages, not library progress bars and deprecation notices."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


@functools.cache
def check_hub(source: str):
    """Before the first hub id is fetched: if the hub (or the HF_ENDPOINT mirror) can't be reached,
    switch to offline mode, so cached models still load and a missing one fails at once instead
    of after half a minute of network retries."""
    import huggingface_hub.constants
    from hub import hub_reachable
    if is_local(source) or huggingface_hub.constants.HF_HUB_OFFLINE or hub_reachable():
        return
    print(f"连不上 Hugging Face Hub（{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}），只在本机缓存中查找模型。",
          flush=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_error(what: str, source: str, err: Exception) -> UserError:
    """One message for every way a hub id or folder can fail to load."""
    if Path(source).expanduser().exists():
        return UserError(f"无法从本地文件夹 {source} 加载{what}：{str(err).splitlines()[0][:200]}。"
                         f"请确认它是 transformers 的 save_pretrained 文件夹（含 config.json 和权重文件）。")
    if is_local(source):
        return UserError(f"找不到{what}的本地文件夹 {source}，请检查路径。")
    import huggingface_hub.constants
    offline = "（离线模式 HF_HUB_OFFLINE=1，只查了本机缓存）" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
    return UserError(
        f"无法获取{what} {source}{offline}：连不上 Hugging Face Hub、本机缓存里没有，或 Hub 上没有这个模型。"
        f"办法：在能联网的机器上先下载（hf download {source} --local-dir 某文件夹）再把该文件夹路径传给本参数；"
        f"或设置镜像后重试（export HF_ENDPOINT=https://hf-mirror.com）。")


def from_hub(load, source: str, what: str, **kw):
    """load(source, **kw), a transformers from_pretrained: quietly, offline when the hub can't be
    reached, and every way it can fail turned into one message (hub_error)."""
    quiet_transformers()
    check_hub(source)
    try:
        return load(source, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise hub_error(what, source, e) from e


def strict_from_pretrained(cls, source: str, what: str, **kw):
    """cls.from_pretrained, but every weight must load: missing or mis-shaped keys are an error
    that names them (never a silent random init, MiniMind-V's trap). Keys the class does not
    use (e.g. the text half of a full CLIP checkpoint) are fine."""
    model, info = from_hub(cls.from_pretrained, source, what, output_loading_info=True, **kw)
    bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if bad:
        raise UserError(f"{what} {source} 的权重没有全部加载，缺少或形状不符的键共 {len(bad)} 个：{', '.join(bad[:8])}"
                        f"{' …' if len(bad) > 8 else ''}。请确认文件夹完整、模型类型正确。")
    return model


# ----------------------------------------------------------------------------- vision

class HFVisionTower(nn.Module):
    """pixels (B, 3, S, S), normalised -> hidden states of `feature_layer` (B, N, Dv), CLS
    dropped (LLaVA's "default" strategy; SigLIP has no CLS). -2 = penultimate layer, LLaVA's choice."""

    def __init__(self, model: nn.Module, source: str, feature_layer: int = -2):
        super().__init__()
        self.model, self.source, self.feature_layer = model, source, feature_layer
        self.family = vision_family(model.config.model_type)
        self.has_cls = self.family.has_cls
        n_layers = model.config.num_hidden_layers
        if not -n_layers <= feature_layer <= n_layers:
            raise UserError(f"--vision-layer {feature_layer} 超出范围：{source} 只有 {n_layers} 层"
                            f"（可取 {-n_layers}…{n_layers}，-1 为最后一层）。")

    hf_model = property(lambda self: self.model)                    # as HFLanguageModel.hf_model

    @property
    def image_size(self) -> int:
        c = self.model.config
        if self.family.naflex:                                         # use a fixed square grid
            return int(c.num_patches ** 0.5) * c.patch_size
        return c.image_size

    def forward(self, pixels):
        kw = {}
        if self.family.naflex:                                         # takes patches, not images
            B, C, H, W = pixels.shape
            p = self.model.config.patch_size
            pixels = (pixels.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
                      .reshape(B, (H // p) * (W // p), p * p * C))
            kw = {"pixel_attention_mask": torch.ones(pixels.shape[:2], dtype=torch.long, device=pixels.device),
                  "spatial_shapes": torch.tensor([[H // p, W // p]] * B, device=pixels.device)}
        h = self.model(pixel_values=pixels, output_hidden_states=True, **kw).hidden_states[self.feature_layer]
        return h[:, 1:] if self.has_cls else h

    def llava_vision(self):
        """(config, weights) for the LLaVA export: the tower as it is."""
        if self.family.naflex:
            raise UserError("SigLIP2 视觉塔（NaFlex）没有对应的 LLaVA 格式，暂不能导出；请改用 CLIP 或 SigLIP 视觉塔。")
        return self.model.config, self.model.state_dict()


def load_vision_tower(source: str, feature_layer: int = -2, config: dict | None = None):
    """(tower, preprocessing dict). With `config` (from a full checkpoint) the tower is built
    from it and its weights come later; otherwise they load strictly from `source`."""
    import transformers
    quiet_transformers()
    if config is None:
        cfg = from_hub(transformers.AutoConfig.from_pretrained, source, "视觉编码器")
        cfg = getattr(cfg, "vision_config", None) or cfg             # a full CLIP/SigLIP repo holds both towers
        if vision_family(cfg.model_type) is None:
            raise UserError(f"{source} 的模型类型是 {cfg.model_type}，不是支持的视觉塔（CLIP、SigLIP、SigLIP2）。")
    else:
        cfg = transformers.AutoConfig.for_model(**config)
    cls = getattr(transformers, vision_family(cfg.model_type).model_class)
    model = strict_from_pretrained(cls, source, "视觉编码器") if config is None else cls(cfg)
    tower = HFVisionTower(model, source, feature_layer)
    return tower.float(), image_preprocessing(source, tower)


def image_preprocessing(source: str, tower: HFVisionTower) -> dict:
    """Image size from the tower; mean/std from its own preprocessor config (the family's defaults without one)."""
    from transformers import AutoImageProcessor
    try:
        proc = AutoImageProcessor.from_pretrained(source)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, AttributeError):
        mean, std = tower.family.mean_std
    return {"vit_image_size": tower.image_size, "vit_patch_size": tower.model.config.patch_size,
            "vit_image_mean": mean, "vit_image_std": std}


# ----------------------------------------------------------------------------- language model

class HFLanguageModel(nn.Module):
    """A transformers causal LM (optionally with peft LoRA adapters) behind LanguageModel's interface."""
    max_len = None              # positions are computed, not looked up: no hard context limit
    packs = False               # it reads a 2-D key mask from ours (forward): one sample per row

    def __init__(self, model: nn.Module, source: str):
        super().__init__()
        self.model, self.source = model, source          # model: *ForCausalLM, or a peft model around one
        self.lora = None                                 # LoRA settings once adapters are added

    @property
    def hf_model(self):
        """The *ForCausalLM itself (inside the peft wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def embed(self, ids):
        return self.hf_model.get_input_embeddings()(ids)

    def forward(self, x, positions, mask=None, cache=None, queries=None):
        # our mask (B, 1, T, T_total)'s last query row sees every key the batch may: transformers' 2-D key mask
        key_mask = None if mask is None else mask[:, 0, -1, :].long()
        decoder = self.hf_model.get_decoder()
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        out = decoder(inputs_embeds=x, position_ids=positions, attention_mask=key_mask, use_cache=cache is not None,
                      **{cache_arg: cache})                  # transformers 5.x renamed past_key_values
        return at_columns(out.last_hidden_state, queries)  # computed for all, returned for `queries`

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def logits(self, h):
        return self.get_output_embeddings()(h)

    def new_cache(self, batch: int, max_len: int):
        from hf_cache import StackedDynamicCache
        return StackedDynamicCache()

    def llava_text(self):
        """(config, decoder weights, lm_head weight) for the LLaVA export; LoRA is merged first."""
        causal = self.model.merge_and_unload() if self.lora else self.model      # changes this module in place
        return causal.config, causal.get_decoder().state_dict(), causal.get_output_embeddings().weight

    def add_lora(self, r: int, alpha: int | None = None):
        """LoRA adapters on every linear layer of the LLM (not lm_head); the base stays frozen."""
        from peft import LoraConfig, get_peft_model
        self.lora = {"r": r, "alpha": alpha or 2 * r}
        self.model = get_peft_model(self.model, LoraConfig(r=r, lora_alpha=self.lora["alpha"], lora_dropout=0.0,
                                                           target_modules="all-linear"))


def load_causal_lm(source: str, config: dict | None = None, tokenizer: ChatTemplateTokenizer | None = None):
    """(HFLanguageModel, ChatTemplateTokenizer). `<image>` is added to the tokenizer as a special token and the
    embeddings grow to fit, new rows set to the mean embedding (deterministic, so a delta checkpoint rebuilds the
    very same base). With `config` (full checkpoint) the model is built from it and the tokenizer must be given."""
    import transformers
    quiet_transformers()
    if config is not None:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                              attn_implementation="sdpa")
        return HFLanguageModel(model.float(), source), tokenizer
    model = strict_from_pretrained(transformers.AutoModelForCausalLM, source, "语言模型", dtype=torch.float32,
                                   attn_implementation="sdpa")
    if tokenizer is None:
        hf_tok = from_hub(transformers.AutoTokenizer.from_pretrained, source, "语言模型的分词器")
        if IMAGE not in hf_tok.get_vocab():
            hf_tok.add_tokens([IMAGE], special_tokens=True)
        try:
            tokenizer = ChatTemplateTokenizer(hf_tok)
        except ValueError as e:
            raise UserError(f"{source} 的分词器无法使用：{e}") from e
    grow_embeddings(model, tokenizer.vocab_size)
    return HFLanguageModel(model, source), tokenizer


@torch.no_grad()
def grow_embeddings(model, n: int):
    old = model.get_input_embeddings().weight.shape[0]
    if n <= old:
        return
    out_old = model.get_output_embeddings().weight[:old].mean(0)
    mean = model.get_input_embeddings().weight.mean(0)
    model.resize_token_embeddings(n, mean_resizing=False)
    model.get_input_embeddings().weight[old:] = mean
    model.get_output_embeddings().weight[old:] = out_old if not model.config.tie_word_embeddings else mean


# ----------------------------------------------------------------------------- assembling a VLM

def is_hf_lm(checkpoint: str | None) -> bool:
    """--checkpoint names an HF causal LM (folder or hub id) rather than one of our .pt files."""
    return bool(checkpoint) and not checkpoint.endswith(".pt") and not Path(checkpoint).is_file()


def build_vlm(vision_source: str | None = None, lm_source: str | None = None, vision_layer: int = -2,
              base: tuple | None = None, scratch_cfg: VLMConfig | None = None):
    """A VLM with a new projector between
    - vision: the HF tower `vision_source`, else base's encoder, else a new built-in ViT (scratch_cfg);
    - LM: the HF causal LM `lm_source`, else base's LM (base = (VLM, Tokenizer) from our .pt).
    Returns (model, tokenizer). A built-in part taken from `base` keeps its trained weights."""
    if lm_source:
        lm, tok = load_causal_lm(lm_source)
        c = lm.hf_model.config
        lm_fields = dict(lm_vocab_size=lm.hf_model.get_input_embeddings().weight.shape[0], lm_dim=c.hidden_size,
                         lm_layers=c.num_hidden_layers, lm_heads=c.num_attention_heads,
                         lm_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                         lm_hidden=c.intermediate_size, lm_max_len=c.max_position_embeddings)
    else:
        if base is None:
            raise UserError("使用预训练视觉编码器时需要一个语言模型：用 --checkpoint 给出本工具的 .pt 或 Hugging Face 语言模型。")
        lm, tok = base[0].lm, base[1]
        lm_fields = {k: v for k, v in base[0].cfg.to_dict().items() if k.startswith("lm_")}
    if vision_source:
        vision, vit_fields = load_vision_tower(vision_source, vision_layer)
        c = vision.model.config
        vit_fields.update(vit_dim=c.hidden_size, vit_layers=c.num_hidden_layers, vit_heads=c.num_attention_heads,
                          vit_mlp_ratio=c.intermediate_size / c.hidden_size)
    else:
        src = base[0] if base is not None and base[0].vision.source is None else None
        vision = src.vision if src is not None else None
        vit_fields = {k: v for k, v in (src.cfg if src is not None else scratch_cfg or VLMConfig()).to_dict().items()
                      if k.startswith("vit_")}
    cfg = VLMConfig(**vit_fields, **lm_fields, image_token_id=tok.image_id, pad_token_id=tok.pad_id,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return VLM(cfg, vision=vision, lm=lm), tok


def hf_parts(model: VLM) -> list[nn.Module]:
    """The pretrained parts: those that name a source their weights come from."""
    return [m for m in (model.vision, model.lm) if m.source is not None]


# ----------------------------------------------------------------------------- what trains

def configure_training(model: VLM, train: str, lr: float, projector_lr: float | None = None,
                       backbone_lr: float | None = None, lora_r: int = 16, gradient_checkpointing: bool = False):
    """Freeze / unfreeze per the choice (TRAINS; the default with an existing LLM is
    vision+projector) and tag each trainable parameter with `lr_scale` (optim.param_groups
    turns equal scales into one optimizer group). Pretrained (HF) parts learn at backbone_lr
    (default lr/10), the projector at projector_lr (default lr), built-in parts from scratch at lr."""
    if train not in TRAIN_CHOICES:
        raise UserError(f"--train 只能是 {' / '.join(TRAIN_CHOICES)}。")
    for value, name in ((projector_lr, "--projector-lr"), (backbone_lr, "--backbone-lr"), (lr, "--lr")):
        if value is not None and not value > 0:
            raise UserError(f"{name} 必须是大于 0 的数。")
    trains, lora = TRAINS[train]
    if lora:
        if model.lm.source is None:
            raise UserError(f"--train {train} 需要 Hugging Face 语言模型（--checkpoint 给出其文件夹或 hub id）。")
        if lora_r < 1:
            raise UserError("--lora-r 必须是正整数。")
    if gradient_checkpointing and not hf_parts(model):
        raise UserError("--gradient-checkpointing 只对预训练骨干（--vision-encoder 或 Hugging Face 语言模型）有效。")
    for name in ("vision", "projector", "lm"):
        getattr(model, name).requires_grad_(name in trains)
    if "vision" in trains and model.vision.source is not None:
        freeze_unused(model.vision)
    if lora and model.lm.lora is None:
        model.lm.add_lora(lora_r)                                   # adds trainable adapters only
    elif lora:                                                      # continuing: keep the trained adapters
        for name, p in model.lm.named_parameters():
            p.requires_grad_("lora_" in name)
    backbone_scale = (backbone_lr or lr * 0.1) / lr
    for name in ("vision", "projector", "lm"):
        part = getattr(model, name)
        scale = (projector_lr or lr) / lr if name == "projector" else backbone_scale if part in hf_parts(model) else 1.0
        for p in part.parameters():
            p.lr_scale = scale
    if gradient_checkpointing:
        for part in hf_parts(model):
            part.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def freeze_unused(tower: HFVisionTower):
    """Layers above the feature layer (and CLIP's pooled-output norm, SigLIP's pooling head) never
    reach the features: freeze them, so the optimizer, DDP and delta checkpoints skip them."""
    size = tower.image_size
    tower.zero_grad(set_to_none=True)
    tower(torch.zeros(1, 3, size, size, device=next(tower.parameters()).device)).float().sum().backward()
    for p in tower.parameters():
        if p.grad is None:
            p.requires_grad_(False)
    tower.zero_grad(set_to_none=True)


def trainable_summary(model: VLM) -> str:
    parts = []
    for name, label in (("vision", "视觉编码器"), ("projector", "投影层"), ("lm", "语言模型")):
        ps = list(getattr(model, name).parameters())
        n, t = sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)
        parts.append(f"{label} {t / 1e6:.2f}M/{n / 1e6:.2f}M")
    return "可训练参数：" + "，".join(parts)


# ----------------------------------------------------------------------------- command line

def add_flags(p):
    """Flags for the training scripts (see docs/models.md)."""
    g = p.add_argument_group("预训练骨干（详见 docs/models.md）",
                             "--checkpoint 也可以是 Hugging Face 因果语言模型（hub id 或本地文件夹，如 "
                             "Qwen/Qwen2.5-0.5B-Instruct），它连同自己的分词器和对话模板作为已有的语言模型使用。")
    g.add_argument("--vision-encoder", metavar="HUB_ID或文件夹",
                   help="用 Hugging Face 的 CLIP / SigLIP / SigLIP2 视觉塔（如 openai/clip-vit-base-patch16）代替内置 ViT")
    g.add_argument("--vision-layer", type=int, default=-2,
                   help="取视觉塔哪一层的输出作为图像特征 (默认: -2，倒数第二层，同 LLaVA)")
    g.add_argument("--train", choices=TRAIN_CHOICES,
                   help="训练哪些部分：projector 只训投影层 / vision+projector 视觉编码器+投影层，语言模型冻结 / "
                        "lora 再加语言模型上的 LoRA / all 全部 / projector+lm 投影层+语言模型，视觉冻结（LLaVA 第二阶段）/ "
                        "projector+lora 投影层+LoRA，视觉冻结 (默认: --checkpoint 是 Hugging Face 语言模型时 "
                        "vision+projector，否则 all)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA 的秩 r，alpha 取 2r (默认: 16)")
    g.add_argument("--projector-lr", type=float, help="投影层学习率 (默认: 同 --lr)")
    g.add_argument("--backbone-lr", type=float, help="预训练骨干（视觉塔、语言模型、LoRA）的学习率 (默认: --lr 的 1/10)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="对预训练骨干开启梯度检查点：省显存，约慢 30%%")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--save-delta", dest="save", action="store_const", const="delta",
                   help="检查点只存训练改动的部分 + 基础模型的引用（用了 Hugging Face 骨干时的默认）")
    s.add_argument("--save-full", dest="save", action="store_const", const="full",
                   help="检查点存全部权重，不再依赖基础模型文件夹")


def build(a, default_build):
    """(model, tokenizer, meta) for a training script. default_build() is the script's own choice
    (our .pt from --checkpoint, or a new model); backbone flags change it:
      --checkpoint an HF causal LM (folder / hub id) -> that LLM, its tokenizer and template;
      --vision-encoder -> that tower instead of the built-in ViT (with a new projector)."""
    if is_hf_lm(a.checkpoint):
        from model import PRESETS
        model, tok = build_vlm(a.vision_encoder, a.checkpoint, a.vision_layer,
                               scratch_cfg=VLMConfig(**PRESETS[getattr(a, "preset", "tiny")]))
        meta = {"base": a.checkpoint}
    else:
        model, tok, meta = default_build()
        if a.vision_encoder and model.vision.source != a.vision_encoder:
            model, tok = build_vlm(a.vision_encoder, None, a.vision_layer, base=(model, tok))
    pretrained_lm = model.lm.source is not None
    train = a.train or ("lora" if pretrained_lm and model.lm.lora else "vision+projector" if pretrained_lm else "all")
    configure_training(model, train, a.lr, a.projector_lr, a.backbone_lr, a.lora_r, a.gradient_checkpointing)
    uses_hf = bool(hf_parts(model))
    weights = a.save or ("delta" if uses_hf else "full")
    if weights == "delta" and not uses_hf:
        raise UserError("--save-delta 只适用于 Hugging Face 骨干（--vision-encoder 或 Hugging Face 语言模型）；"
                        "内置模型的检查点总是完整保存。")
    print(trainable_summary(model) + f"；训练方式 {train}，检查点{'只存改动部分' if weights == 'delta' else '存全部权重'}")
    meta = {**meta, "train": train, "weights": weights}
    if a.vision_encoder:
        meta["vision_encoder"] = a.vision_encoder
    return model, tok, meta
