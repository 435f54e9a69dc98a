"""Checkpoint files: one self-contained .pt (config + tokenizer + weights) that loads with
`torch.load(path, weights_only=True)`, written atomically; resume state in a file beside it.

    {"format": "vlm-checkpoint", "version": 1, "config": {...}, "tokenizer": "<json>",
     "model": state_dict, "meta": {...}}
A model with Hugging Face backbones (backbones.py) adds "backbones": {"stored": "full"|"delta",
"vision": {source, feature_layer, config} | None, "lm": {source, lora, config} | None[, "fingerprint"]}.
"delta" (chosen with meta["weights"] = "delta") leaves the frozen backbone weights out of "model"
and loads them from the named source again; either kind loads with load_checkpoint.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from backbones import hf_parts, load_causal_lm, load_vision_tower
from errors import UserError
from model import VLM, VLMConfig
from tokenizer import Tokenizer, load_tokenizer

FORMAT, RESUME_FORMAT, VERSION = "vlm-checkpoint", "vlm-resume", 1
SUM_CHUNK = 2 ** 20                 # elements per piece of a fingerprint sum


def resume_path(output: str | Path) -> Path:
    """checkpoints/vision_trained_model.pt -> checkpoints/vision_trained_model.resume.pt"""
    p = Path(output)
    return p.with_name(p.stem + ".resume.pt")


def atomic_save(obj, path: str | Path):
    """Write to a temp file in the same folder, fsync, then rename over the target: a crash or a
    full disk never leaves a half-written file where the previous good one was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            sync_folder(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"无法写入检查点 {path}：{os_reason(e)}。请检查磁盘空间和文件夹写权限；"
                        f"之前保存的检查点未受影响。") from e


def remove_stale_temps(path: Path):
    """Temp files of writers that were killed mid-write (SIGKILL, power loss) would otherwise
    pile up beside the checkpoint, each as big as a checkpoint."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync_folder(folder: Path):
    """Make the rename itself durable (POSIX); not possible on Windows, where it is skipped."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


OS_REASONS = {errno.ENOSPC: "磁盘已满", errno.EDQUOT: "超出磁盘配额", errno.EROFS: "文件系统是只读的",
              errno.EACCES: "没有写权限", errno.EPERM: "没有写权限"}


def os_reason(e: OSError) -> str:
    reason = OS_REASONS.get(e.errno)
    return f"{reason}（{e.strerror}）" if reason else str(e.strerror or e)


def check_writable(path: str | Path, need_bytes: int = 0):
    """Fail before training starts, not hours later, if the output folder can't take a file
    (read-only, no permission) or has less free space than one file of `need_bytes`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe{os.getpid()}")
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        raise UserError(f"输出位置 {path.parent} 不可写：{os_reason(e)}。请换一个 --output 路径。") from e
    if free < need_bytes:
        raise UserError(f"输出位置 {path.parent} 只剩 {free / 2 ** 20:.1f} MB 可用，保存一次断点就需要约 "
                        f"{need_bytes / 2 ** 20:.1f} MB。请清理磁盘，或换一个 --output 路径。")


def uses_backbones(model: VLM) -> bool:
    """True when a part is not the built-in one (a Hugging Face backbone, see backbones.py)."""
    return bool(hf_parts(model))


def checkpoint_dict(model: VLM, tokenizer: Tokenizer, meta: dict | None = None) -> dict:
    meta = meta or {}
    obj = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
           "tokenizer": tokenizer.to_str(),
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "meta": meta}
    if uses_backbones(model):
        obj["model"], obj["backbones"] = backbones_entry(model, obj["model"], meta.get("weights") == "delta")
    return obj


def backbones_entry(model: VLM, state: dict, delta: bool) -> tuple[dict, dict]:
    """(state to store, "backbones" entry). delta: frozen weights of the HF parts are left out;
    the entry names their source and a fingerprint that must match when they are loaded back."""
    entry = {"stored": "delta" if delta else "full", "vision": None, "lm": None}
    if model.vision.source is not None:
        entry["vision"] = {"source": model.vision.source, "feature_layer": model.vision.feature_layer,
                           "config": model.vision.hf_model.config}
    if model.lm.source is not None:
        entry["lm"] = {"source": model.lm.source, "lora": model.lm.lora, "config": model.lm.hf_model.config}
    if delta:
        frozen = backbone_keys(model, frozen_only=True)
        state = {k: v for k, v in state.items() if k not in frozen}
        entry["fingerprint"] = fingerprint(model, frozen, torch.bfloat16)   # the same if training held it in bf16
    for part in ("vision", "lm"):                         # JSON text: plain types for weights_only loading
        if entry[part] is not None:
            entry[part]["config"] = json.dumps(entry[part]["config"].to_dict(), default=str)
    return state, entry


def backbone_keys(model: VLM, frozen_only: bool = False) -> set[str]:
    """State-dict keys of the HF parts' parameters (tied weights under every name they have);
    frozen_only: just those that do not train, i.e. still equal the base weights."""
    prefixes = tuple(name + "." for name in ("vision", "lm") if getattr(model, name) in hf_parts(model))
    return {k for k, v in model.state_dict(keep_vars=True).items()
            if k.startswith(prefixes) and isinstance(v, nn.Parameter) and not (frozen_only and v.requires_grad)}


@torch.no_grad()
def fingerprint(model: VLM, keys: set[str], dtype=None) -> float:
    """Sum of the base weights (accumulated in float64), each rounded to `dtype` if given: a cheap
    check that the base a delta checkpoint refers to is still the one it was trained on. Rounded
    to bf16 it is the same whether training held the frozen base in fp32 or in bf16
    (devices.store_frozen_in). Summed SUM_CHUNK elements at a time: a float64 copy of a whole
    embedding matrix (262 MB for 32k x 1024) would raise the run's peak at every save."""
    state = model.state_dict()
    return sum(float(piece.to(dtype or piece.dtype).sum(dtype=torch.float64))
               for k in sorted(keys) for piece in state[k].reshape(-1).split(SUM_CHUNK))


def save_checkpoint(path, model: VLM, tokenizer: Tokenizer, meta: dict | None = None):
    atomic_save(checkpoint_dict(model, tokenizer, meta), path)


def read_file(path: str | Path, what: str = "模型文件", fmt: str = FORMAT) -> dict:
    """torch.load with weights_only=True, turning every expected failure into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到{what} {path}。请先训练一个（python train_vision.py），或检查路径。")
    if not is_torch_file(path):
        raise UserError(f"{what} {path} 不是 PyTorch 文件（可能是图片、文本或下载不完整的文件），无法读取。"
                        f"请用 train_vision.py / train_vision_real.py 训练得到的 .pt 文件。")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{what} {path} 含有不安全的内容（可执行代码或非张量对象），已拒绝加载。"
                        f"只加载你信任的、由本工具保存的文件。") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{what} {path} 已损坏或不是 PyTorch 文件，无法读取（{type(e).__name__}）。") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{path} 不是本工具保存的{what}（缺少 format={fmt!r} 标记）。"
                        f"请用 train_vision.py / train_vision_real.py 训练得到的 .pt 文件。")
    if type(obj.get("version", 0)) is not int:
        raise UserError(f"{path} 的版本号 {obj['version']!r} 无效，文件已被改动或不是本工具保存的。")
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{path} 由更新版本的工具保存（版本 {obj['version']}），请升级本工具。")
    return obj


def claim_output(path: str | Path, meta: dict, overwrite: bool):
    """A new run may replace a model of the same data (running the same command again), never
    silently one trained on other data, nor a file that is not a checkpoint of ours."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    try:
        theirs, ours = read_file(path).get("meta", {}).get("data"), True
    except UserError:
        theirs, ours = None, False
    if ours and theirs == meta.get("data"):
        return
    what = f"另一次训练（数据：{data_name(theirs)}）保存的模型" if ours else "一个不是本工具保存的模型文件（或已损坏）"
    raise UserError(f"{path} 已经是{what}，本次训练（数据：{data_name(meta.get('data'))}）不会覆盖它。"
                    f"请用 --output 另存（如 --output checkpoints/my_model.pt），确实要替换时加 --overwrite。")


def data_name(data) -> str:
    if data == "synthetic":
        return "内置合成场景"
    return "、".join(data) if isinstance(data, list) else str(data)


def discard_resume(output: str | Path):
    """A run that finished needs no resume state: don't leave a file as big as the model behind."""
    resume_path(output).unlink(missing_ok=True)


def is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle, which starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


# Sane bounds for a config's sizes, checked before anything is allocated: a file's config alone
# must not decide that start-up allocates terabytes (a 10^12 context, a million layers).
CONFIG_BOUNDS = {"vit_image_size": (8, 4096), "vit_patch_size": (1, 4096), "vit_dim": (1, 16384),
                 "vit_layers": (1, 512), "vit_heads": (1, 1024), "lm_vocab_size": (2, 2 ** 21),
                 "lm_dim": (1, 65536), "lm_layers": (1, 1024), "lm_heads": (1, 1024), "lm_kv_heads": (1, 1024),
                 "lm_hidden": (1, 2 ** 18), "lm_max_len": (16, 2 ** 20)}
MAX_PARAMETERS = 2 ** 36            # a lower bound on the built-in model's size must stay under this


def check_config(cfg: VLMConfig):
    """Raise ValueError for a config no model of ours has: sizes out of bounds, not integers."""
    for key, (lo, hi) in CONFIG_BOUNDS.items():
        value = getattr(cfg, key)
        if type(value) is not int or not lo <= value <= hi:
            raise ValueError(f"{key}={value!r} 超出合理范围（应为 {lo} 到 {hi} 的整数）")
    if cfg.vit_layout not in ("siglip", "clip"):
        raise ValueError(f"vit_layout={cfg.vit_layout!r} 不是 siglip 或 clip")
    for key in ("vit_mlp_ratio", "lm_rope_theta", "lm_norm_eps"):
        if type(getattr(cfg, key)) not in (int, float) or not 0 < getattr(cfg, key) < 1e12:
            raise ValueError(f"{key}={getattr(cfg, key)!r} 不是合理的正数")
    least = cfg.lm_layers * 3 * cfg.lm_dim * cfg.lm_hidden + cfg.vit_layers * 8 * cfg.vit_dim ** 2
    if least > MAX_PARAMETERS:
        raise ValueError(f"这些尺寸意味着至少 {least:,} 个参数，超出上限 {MAX_PARAMETERS:,}")


def model_from_dict(obj: dict, path="检查点") -> tuple[VLM, Tokenizer]:
    try:
        cfg = VLMConfig.from_dict(obj["config"])
        check_config(cfg)
        tokenizer = load_tokenizer(obj["tokenizer"])
    except Exception as e:  # any malformed field: the file is not ours or was edited
        raise UserError(f"{path} 的配置或分词器无法解析：{e}") from e
    model = backbones_model(obj["backbones"], cfg, tokenizer) if "backbones" in obj else VLM(cfg)
    load_weights(model, obj, path)
    return model, tokenizer


def backbones_model(entry: dict, cfg: VLMConfig, tokenizer) -> VLM:
    """A VLM with its HF parts rebuilt from the "backbones" entry: from the stored configs
    ("full": their weights are in the file) or from their sources ("delta": the base weights)."""
    full = entry["stored"] == "full"
    vision = lm = None
    if entry["vision"]:
        v = entry["vision"]
        vision, _ = load_vision_tower(v["source"], v["feature_layer"], json.loads(v["config"]) if full else None)
    if entry["lm"]:
        l = entry["lm"]
        lm, _ = load_causal_lm(l["source"], json.loads(l["config"]) if full else None, tokenizer)
        if l["lora"]:
            lm.add_lora(l["lora"]["r"], l["lora"]["alpha"])
    return VLM(cfg, vision=vision, lm=lm)


def load_weights(model: VLM, obj: dict, path="检查点"):
    """Load obj["model"] into model: strictly for a full checkpoint; for a delta, every stored
    key must load and every key not stored must be a base weight that checks out."""
    entry = obj.get("backbones") or {"stored": "full"}
    try:
        missing, unexpected = model.load_state_dict(obj["model"], strict=False)
    except RuntimeError as e:                                   # shape mismatches
        raise UserError(f"{path} 的权重与模型结构不符：{str(e).splitlines()[-1].strip()}") from e
    base = set(missing) & backbone_keys(model) if entry["stored"] == "delta" else set()
    missing = [k for k in missing if k not in base]
    if missing or unexpected:
        raise UserError(f"{path} 的权重与模型结构不符：缺少 {sorted(missing)[:5]}，多余 {sorted(unexpected)[:5]}。")
    same = lambda dtype: math.isclose(fingerprint(model, base, dtype), entry["fingerprint"], rel_tol=1e-6, abs_tol=1e-3)
    if base and not any(same(dtype) for dtype in (torch.bfloat16, None)):       # None: files before bf16 sums
        sources = ", ".join(e["source"] for e in (entry["vision"], entry["lm"]) if e)
        raise UserError(f"{path} 只存了训练改动的部分，但它引用的基础模型（{sources}）的权重和训练时不一样。"
                        f"请换回训练时用的基础模型。")


def restore_weights(model: VLM, obj: dict, path="检查点"):
    """Load a checkpoint dict's weights into an already built model (e.g. on --resume)."""
    if "backbones" in obj:
        return load_weights(model, obj, path)
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise UserError(f"{path} 的权重与当前模型结构不符（例如 --preset 或 --checkpoint 与保存时不同）："
                        f"{str(e).splitlines()[-1].strip()}。请用与保存时相同的参数运行。") from e


def load_checkpoint(path, device="cpu") -> tuple[VLM, Tokenizer, dict]:
    """(model in eval mode on device, tokenizer, meta). Strict: every weight must load."""
    obj = read_file(path)
    model, tokenizer = model_from_dict(obj, path)
    return model.to(device).eval(), tokenizer, obj.get("meta", {})


# ----------------------------------------------------------------------------- resume state
#   {"format": "vlm-resume", "version": 1, "checkpoint": <a checkpoint dict>, "aux": state_dict | None,
#    "optimizer": ..., "scaler": ..., "step", "epoch", "batch_in_epoch", "seen_in_epoch", "world_size",
#    "best", "skipped", "rng": {"torch", "cuda"?}, "train_config": {...}}

def resume_state(model: VLM, tokenizer: Tokenizer, meta: dict, aux, optimizer, scaler, progress: dict,
                 train_config: dict) -> dict:
    """Everything a run needs to continue where it stopped; `progress` holds the loop's counters."""
    return {"format": RESUME_FORMAT, "version": VERSION, "checkpoint": checkpoint_dict(model, tokenizer, meta),
            "aux": aux.state_dict() if aux is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            **progress, "rng": rng_state(), "train_config": train_config}


class ResumeWriter:
    """Writes resume state beside `output`, by default in a background thread: save() takes a
    CPU copy of the state between two steps (memory copies only) and the write itself (torch.save,
    fsync, rename) overlaps the next steps. One write at a time; wait() finishes the one in flight
    and raises its error (a full disk, say) in the training thread."""

    def __init__(self, output: str | Path):
        self.path, self.thread, self.error = resume_path(output), None, None

    def save(self, state: dict, background: bool = True):
        self.wait()
        state = cpu_copy(state)
        if not background:
            return atomic_save(state, self.path)
        self.thread = threading.Thread(target=self._write, args=(state,), name="resume-save")
        self.thread.start()

    def _write(self, state):
        try:
            atomic_save(state, self.path)
        except BaseException as e:            # noqa: BLE001 - handed to the training thread by wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def cpu_copy(obj):
    """obj with every tensor copied to the CPU, detached from what training goes on changing."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def load_resume(output: str | Path, train_config: dict, model: VLM, aux, optimizer, scaler) -> dict:
    """Restore the weights, optimizer, scaler and random state saved beside `output` and return
    the file's counters and "train_config". Files of older versions gain "seen_in_epoch" and
    "world_size"; another --batch-size or --optimizer than the saved one is refused."""
    path = resume_path(output)
    obj = read_file(path, "断点文件", RESUME_FORMAT) if path.exists() else None
    if obj is None:
        raise UserError(f"找不到断点文件 {path}，无法 --resume。去掉 --resume 从头训练，或检查 --output。")
    saved = {"optimizer": "adamw", **obj["train_config"]}       # files from before --optimizer: AdamW
    for key, what in (("batch_size", "（每个进程）"), ("optimizer", "")):
        if saved[key] != train_config[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"断点用的是 {flag} {saved[key]}{what}，继续训练时必须相同（这次是 {train_config[key]}）。")
    restore_weights(model, obj["checkpoint"], path)
    if aux is not None and obj["aux"] is not None:
        aux.load_state_dict(obj["aux"])
    optimizer.load_state_dict(obj["optimizer"])
    scaler.load_state_dict(obj["scaler"])
    set_rng_state(obj["rng"])
    obj.setdefault("seen_in_epoch", obj["batch_in_epoch"] * saved["batch_size"])
    obj.setdefault("world_size", 1)
    return obj


def resume_bytes(model: VLM, aux, optimizer, delta: bool) -> int:
    """A bound on the size of one resume-state file: the stored weights plus two moments per trained
    parameter (AdamW's; Muon keeps one, so with it this overestimates). Frozen backbone weights of a
    "delta" checkpoint are not stored."""
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    moments = 2 * sum(p.numel() * p.element_size() for p in trained)
    if delta:
        return moments + sum(p.numel() * p.element_size() for p in trained)
    modules = [model] + ([aux] if aux is not None else [])
    return moments + sum(v.numel() * v.element_size() for m in modules for v in m.state_dict().values())


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
