"""User-facing errors: one clear (Chinese) sentence and a non-zero exit, no traceback.

Raise UserError for every mistake a user can make (bad flag, missing file, broken data); let
real bugs raise anything else so their traceback is kept.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys


class UserError(Exception):
    """An expected mistake; str(e) is shown to the user as is."""


def cli(main):
    """Wrap a command's main(): UserError -> "错误：…" on stderr, exit 2; Ctrl-C -> exit 130."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"错误：{e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("\n已中断。", file=sys.stderr)
            sys.exit(130)
    return wrapper


# argparse's own messages, as Python 3.11-3.13 word them, in Chinese
_ARGPARSE = [
    (r"argument (\S+): invalid int value: (.*)", "参数 {0} 需要一个整数，收到的是 {1}。"),
    (r"argument (\S+): invalid float value: (.*)", "参数 {0} 需要一个数，收到的是 {1}。"),
    (r"argument (\S+): invalid choice: (.*?) \(choose from (.*)\)", "参数 {0} 不能取 {1}，可选：{2}。"),
    (r"argument (\S+): expected one argument", "参数 {0} 后面缺少取值。"),
    (r"argument (\S+): expected at least one argument", "参数 {0} 后面至少要给一个值。"),
    (r"argument (\S+): not allowed with argument (\S+)", "参数 {0} 不能和 {1} 同时使用。"),
    (r"argument (\S+): ignored explicit argument (.*)", "参数 {0} 不接受取值（收到 {1}）。"),
    (r"unrecognized arguments: (.*)", "无法识别的参数：{0}。"),
    (r"the following arguments are required: (.*)", "缺少必需的参数：{0}。"),
    (r"ambiguous option: (\S+) could match (.*)", "参数 {0} 有歧义，可能是：{1}。"),
    (r"argument (\S+): (.*)", "参数 {0} {1}。"),            # our own type checks word the rest in Chinese
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors read like every other error here: one line "错误：…", exit 2."""

    def error(self, message):
        for pattern, zh in _ARGPARSE:
            m = re.fullmatch(pattern, message)
            if m:
                message = zh.format(*m.groups())
                break
        else:                                            # a message not in the table stays as it is
            message += "。"
        self.exit(2, f"错误：{message}用 {self.prog} --help 查看全部参数。\n")
