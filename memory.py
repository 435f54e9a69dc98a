"""Letting go of a memory-mapped weights file's pages (Linux; elsewhere drop_file_pages does nothing).

transformers memory-maps safetensors files: a weight loaded from one points into the mapping, and
reading it (to cast it to bf16, say) maps the file's pages into this process, where they count
as resident until the last weight of the file is gone. Casting a 1 GB fp32 model so held the
whole file and its bf16 copy at once (2173 MB peak for a 249M Llama, bench/bench_memory.py);
dropping each weight's pages once it is copied keeps one weight of the file at a time (1350 MB).
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import mmap
import re
from pathlib import Path

import torch

MADV_DONTNEED = 4


@functools.cache
def libc():
    """The C library's madvise, or None where there is none to call."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(lib, "madvise"):
        return None
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def unwritten_file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) of this process's file mappings with no page written since it was
    mapped: every resident page there equals the file, so dropping one loses nothing."""
    smaps = Path("/proc/self/smaps")
    if libc() is None or not smaps.exists():
        return []
    spans, current = [], None
    for line in smaps.read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ [1-9]\d* +/", line)    # inode != 0: a file
        if head or re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            current = (int(head[1], 16), int(head[2], 16)) if head else None
        elif current and line.startswith("Anonymous:") and line.split()[1] == "0":
            spans.append(current)
    return sorted(spans)


def drop_file_pages(t: torch.Tensor, spans: list[tuple[int, int]]):
    """The whole pages under `t` leave this process's resident set if they lie in one of `spans`
    (unwritten_file_mappings()); read again, they come back from the file (or the page cache)."""
    if not spans or t.device.type != "cpu":
        return
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    i = bisect.bisect_right(spans, (start, float("inf"))) - 1
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if i >= 0 and spans[i][0] <= start and end <= spans[i][1] and hi > lo:
        libc().madvise(lo, hi - lo, MADV_DONTNEED)
