"""Training options: TrainConfig declares each one once (type, default, Chinese help, flag name);
the training scripts' flags are made from it, each script giving its own defaults in one call:

    add_train_flags(parser, batch_size=48, epochs=7, lr=1e-3)   # train_vision.py's defaults
    cfg = config_from_args(parser.parse_args())
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

from errors import UserError


def option(default, help: str | None = None, flag: str | None = None, **argparse_kw):
    """A TrainConfig field. With `help` it is also a command-line flag: --field-name unless `flag`
    names it otherwise; `{default}` in the help shows the default the script runs with."""
    return field(default=default, metadata={"help": help, "flag": flag, **argparse_kw} if help else {})


def batch_size_arg(text: str) -> int | str:
    """--batch-size: a whole number (validate() checks it is positive) or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"需要一个正整数或 auto，收到的是 {text!r}") from None


@dataclass
class TrainConfig:
    """Every training option, declared once; the flags are made from it (add_train_flags), in
    this order. Fields without help text have no flag."""
    batch_size: int | str = option(8, "批次大小 (默认: {default})，每个进程各自的；auto 表示训练前用几步试出放得下的最大批次",
                                   type=batch_size_arg)
    epochs: int = option(10, "训练轮数 (默认: {default})")
    lr: float = option(1e-4, "学习率 (默认: {default:g})")
    checkpoint: str | None = option(None, "基础模型路径：从这个检查点继续训练（默认从头训练）")  # the scripts load it
    output: str = option("checkpoints/vision_trained_model.pt", "输出模型路径 (默认: {default})")
    resume: bool = option(False, "从输出路径旁的断点文件（*.resume.pt）继续上次中断的训练")
    seed: int = option(0, "随机种子 (默认: {default})")
    device: str = option("auto", "设备: auto / cpu / cuda / cuda:N (默认: {default})")
    overwrite: bool = option(False, "允许替换 --output 处另一次训练（用别的数据）保存的模型")
    precision: str = option("auto", "计算精度 (默认: auto = GPU 上用 bf16，不支持 bf16 的 GPU 用 fp16；"
                                    "CPU 上只有实测 bf16 更快（如带 AMX）时才用 bf16，否则 fp32)",
                            choices=["auto", "bf16", "fp16", "fp32"])
    accum: int = option(1, "梯度累积步数 (默认: {default})", flag="--grad-accum")  # micro-batches per optimizer step
    warmup: float = option(0.03, "预热占总步数的比例 (默认: {default:g})")     # share of all optimizer steps
    workers: int = option(-1, "数据加载进程数 (默认: 按机器自动)")              # -1: sized to the machine
    save_minutes: float = option(5.0, "每隔多少分钟保存一次断点（在后台写，训练不用等；每轮结束时也保存）(默认: {default:g})")
    save_every: int = option(0, "另外每多少步保存一次断点，0 表示只按时间和每轮保存 (默认: {default})")  # optimizer steps
    feature_cache_gb: float = option(       # CPU memory for a frozen vision encoder's features (0 = off)
        2.0, "视觉编码器冻结时（如 --train projector / lora），在 CPU 上把每张图的特征算一次后留在内存里，"
             "之后各轮不再过编码器；最多占这么多 GB，0 表示不缓存 (默认: {default:g})")
    log_every: int = option(10, "每多少步读一次损失（进度条上显示）、NaN/Inf 计数和多进程的停止信号；"
                                "读数要等 GPU 算完，所以不每步读 (默认: {default})")
    compile: bool = option(False, "用 torch.compile 编译训练步：首次编译要几十秒到几分钟，之后每步更快（见 docs/benchmarks.md）")
    fsdp: bool = option(False, "用 torchrun 多进程训练时改用 FSDP2：模型按层切分到各进程，每块 GPU 只放自己那一份权重、梯度和"
                               "优化器状态，单卡放不下的大语言模型（如 7B 全量训练）也能训练；bf16 时按 bf16 计算、fp32 汇总梯度"
                               "（见 docs/distributed.md）")
    optimizer: str = option("adamw", "优化器 (默认: {default})：adamw；或 muon = 隐藏层的权重矩阵（各层的 nn.Linear）用 Muon"
                                     "（正交化的动量更新），其余参数用 AdamW。从头训练的小模型用 muon 收敛明显更快（见 docs/training.md）",
                            choices=["adamw", "muon"])
    muon_steps: int = option(5, "--optimizer muon 每步正交化更新时的 Newton–Schulz 迭代次数 (默认: {default})；"
                                "少迭代几次每步更快、正交化粗一些（演示用 3，见 docs/training.md）")
    keep: str = option("best", "保存哪一轮的模型 (默认: {default})：best = 验证损失（或 --select-by 的评分）最好的一轮；"
                               "last = 每轮都存，最后留下学习率按计划降完的那一轮", choices=["best", "last"])
    min_lr_ratio: float = 0.1        # cosine ends at lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 20          # consecutive non-finite steps before giving up
    aux_weight: float = 1.0

    def validate(self):
        checks = [(self.epochs >= 1, "--epochs 必须是正整数"), (self.batch_size == "auto" or self.batch_size >= 1, "--batch-size 必须是正整数或 auto"),
                  (self.lr > 0 and math.isfinite(self.lr), "--lr 必须是大于 0 的数"),
                  (self.accum >= 1, "--grad-accum 必须是正整数"), (self.save_every >= 0, "--save-every 不能是负数"),
                  (self.log_every >= 1, "--log-every 必须是正整数"),
                  (self.save_minutes > 0 and math.isfinite(self.save_minutes), "--save-minutes 必须是大于 0 的数"),
                  (0 <= self.warmup < 1, "--warmup 必须在 [0, 1) 之间"),
                  (self.precision in ("auto", "bf16", "fp16", "fp32"), "--precision 只能是 auto/bf16/fp16/fp32"),
                  (self.feature_cache_gb >= 0, "--feature-cache-gb 不能是负数"),
                  (self.optimizer in ("adamw", "muon"), "--optimizer 只能是 adamw 或 muon"),
                  (self.muon_steps >= 1, "--muon-steps 必须是正整数"),
                  (self.keep in ("best", "last"), "--keep 只能是 best 或 last"),
                  (not (self.fsdp and self.optimizer == "muon"),
                   "--fsdp 不能和 --optimizer muon 一起用：Muon 每步要整块权重矩阵，FSDP 把矩阵切分到了各个进程。请用 --optimizer adamw")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg + "。")


def flag_fields():
    return [f for f in fields(TrainConfig) if f.metadata]


def add_train_flags(p: argparse.ArgumentParser, **defaults):
    """TrainConfig's flags, for both training scripts; `defaults` are one script's own defaults
    (e.g. batch_size=48), the rest come from the fields."""
    unknown = set(defaults) - {f.name for f in flag_fields()}
    if unknown:
        raise TypeError(f"not TrainConfig flags: {sorted(unknown)}")
    for f in flag_fields():
        kw = dict(f.metadata)
        help, flag = kw.pop("help"), kw.pop("flag") or "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        if isinstance(default, bool):
            kw["action"] = "store_true"
        else:
            kw["default"] = default
            if type(default) in (int, float):
                kw.setdefault("type", type(default))
            if flag[2:] != f.name.replace("_", "-"):
                kw["metavar"] = flag[2:].replace("-", "_").upper()   # what argparse shows for the flag's name
        p.add_argument(flag, dest=f.name, help=help.format(default=default), **kw)


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(a, f.name) for f in flag_fields()})
