"""Checkpoint files: one self-contained .pt (config + tokenizer + weights) that loads with
`torch.load(path, weights_only=True)`, written atomically; resume state in a file beside it.

    {"format": "vlm-checkpoint", "version": 1, "config": {...}, "tokenizer": "<json>",
     "model": state_dict, "meta": {...}}
A model with Hugging Face backbones (backbones.py) adds "backbones": {"stored": "full"|"delta",
"vision": {source, config, ...} | None, "lm": {source, config, lora} | None}. "delta" (chosen with
meta["weights"] = "delta") leaves the frozen backbone weights out of "model" and loads them from
the named source again; either kind loads with load_checkpoint.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from errors import UserError
from model import VLM, LanguageModel, VisionEncoder, VLMConfig
from tokenizer import Tokenizer, load_tokenizer

FORMAT, RESUME_FORMAT, VERSION = "vlm-checkpoint", "vlm-resume", 1


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
    return not (isinstance(model.vision, VisionEncoder) and isinstance(model.lm, LanguageModel))


def checkpoint_dict(model: VLM, tokenizer: Tokenizer, meta: dict | None = None) -> dict:
    meta = meta or {}
    obj = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
           "tokenizer": tokenizer.to_str(),
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "meta": meta}
    if uses_backbones(model):
        import backbones                      # transformers is only imported for models that use it
        obj["model"], obj["backbones"] = backbones.checkpoint_entry(model, obj["model"], meta.get("weights") == "delta")
    return obj


def save_checkpoint(path, model: VLM, tokenizer: Tokenizer, meta: dict | None = None):
    atomic_save(checkpoint_dict(model, tokenizer, meta), path)


def read_file(path: str | Path, what: str = "模型文件", fmt: str = FORMAT) -> dict:
    """torch.load with weights_only=True, turning every expected failure into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到{what} {path}。请先训练一个（python train_vision.py），或检查路径。")
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
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{path} 由更新版本的工具保存（版本 {obj['version']}），请升级本工具。")
    return obj


def model_from_dict(obj: dict, path="检查点") -> tuple[VLM, Tokenizer]:
    try:
        cfg = VLMConfig.from_dict(obj["config"])
        tokenizer = load_tokenizer(obj["tokenizer"])
    except Exception as e:  # any malformed field: the file is not ours or was edited
        raise UserError(f"{path} 的配置或分词器无法解析：{e}") from e
    if "backbones" in obj:
        import backbones
        return backbones.model_from_checkpoint(obj, tokenizer, path), tokenizer
    model = VLM(cfg)
    try:
        missing, unexpected = model.load_state_dict(obj["model"], strict=False)
    except RuntimeError as e:                                   # shape mismatches
        raise UserError(f"{path} 的权重与模型结构不符：{str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise UserError(f"{path} 的权重与模型结构不符：缺少 {sorted(missing)[:5]}，多余 {sorted(unexpected)[:5]}。")
    return model, tokenizer


def restore_weights(model: VLM, obj: dict, path="检查点"):
    """Load a checkpoint dict's weights into an already built model (e.g. on --resume)."""
    if "backbones" in obj:
        import backbones
        return backbones.restore_weights(model, obj, path)
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


def save_resume(output: str | Path, state: dict):
    atomic_save(state, resume_path(output))


def load_resume(output: str | Path, batch_size: int, model: VLM, aux, optimizer, scaler) -> dict:
    """Restore the weights, optimizer, scaler and random state saved beside `output` and return
    the file's counters and "train_config". Files of older versions gain "seen_in_epoch" and
    "world_size"; another --batch-size than the saved one is refused."""
    path = resume_path(output)
    obj = read_file(path, "断点文件", RESUME_FORMAT) if path.exists() else None
    if obj is None:
        raise UserError(f"找不到断点文件 {path}，无法 --resume。去掉 --resume 从头训练，或检查 --output。")
    saved = obj["train_config"]
    if saved["batch_size"] != batch_size:
        raise UserError(f"断点用的是 --batch-size {saved['batch_size']}（每个进程），继续训练时必须相同。")
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
    """A lower bound on the size of one resume-state file: the stored weights plus AdamW's two
    moments per trained parameter (frozen backbone weights of a "delta" checkpoint are not stored)."""
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
