"""User-facing errors: one clear (Chinese) sentence and a non-zero exit, no traceback.

Raise UserError for every mistake a user can make (bad flag, missing file, broken data); let
real bugs raise anything else so their traceback is kept.
"""
from __future__ import annotations

import functools
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
