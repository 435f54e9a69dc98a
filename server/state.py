"""What the endpoints share: the settings, the model once it has loaded, the batching engine."""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

import checkpoint
from engine import Engine
from errors import UserError
from server.errors import busy
from server.settings import DTYPES, Settings

log = logging.getLogger("serve")
DECODE_WORKERS = 2
DECODE_NICE = 10             # decode threads' priority below generation and the event loop (Linux)


def load_model(settings: Settings, obj: dict | None):
    """(model, tokenizer, meta) on the chosen device; obj is the already-read checkpoint file.
    (tests/serve_helpers.py replaces this function to hold loading.)"""
    from trainer import resolve_device
    device = resolve_device(settings.device)
    if obj is None:
        obj = checkpoint.read_file(settings.checkpoint)
    model, tok = checkpoint.model_from_dict(obj, settings.checkpoint)
    model = model.to(device=device, dtype=DTYPES[settings.dtype]).eval()
    return model, tok, obj.get("meta", {})


def yield_cpu():
    """A decode thread runs at a lower priority (Linux nice is per thread): while images decode,
    generation and the event loop still get their share of the CPU; idle cores still decode."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):             # not Linux, or not permitted: normal priority
        pass


class Server:
    """Settings, model, tokenizer and engine; `ready` once the background load has finished."""

    def __init__(self, settings: Settings, obj: dict | None = None):
        self.settings, self.obj = settings, obj
        self.model = self.tok = self.engine = self.loop = None
        self.meta, self.ready, self.failed = {}, False, False
        # Images decode here, never in the event loop's default pool: DECODE_WORKERS decodes at
        # once bound their memory (each within uploads.DECODE_BYTES) and CPU; `decoding` counts
        # the requests waiting for or in it (runner.decode admits at most max_batch + max_queue).
        # Text-only requests never enter it. decode_stats: what the workers did (see /health).
        self.decoder = ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode", initializer=yield_cpu)
        self.decoding = 0
        self.decode_stats, self.decode_lock = collections.Counter(), threading.Lock()
        self.on_fatal = lambda: os._exit(2)

    def load(self):
        """Background thread: load, warm up, start the engine; a bad file ends the process."""
        try:
            s = self.settings
            torch.set_num_threads(s.threads or max(1, (os.cpu_count() or 2) // 2))
            self.model, self.tok, self.meta = load_model(s, self.obj)
            self.obj = None
            stop = {self.tok.eos_id} | ({self.tok.user_id} if hasattr(self.tok, "user_id") else set())
            with torch.inference_mode():                          # first call allocates; do it now
                ids = torch.tensor([self.tok.encode_chat([{"role": "user", "content": "hi"}], 0, 0, True)[0]])
                next(iter(self.model.generate(ids.to(self.device), max_new_tokens=1)))
            never = {getattr(self.tok, k, None) for k in ("image_id", "pad_id", "bos_id", "assistant_id")} - stop - {None}
            self.engine = Engine(self.model, stop, s.max_batch, s.max_queue, self.publish, banned=never).start()
            self.ready = True
            log.info("model %s ready on %s", s.checkpoint, self.device)
        except UserError as e:
            print(f"错误：{e}", file=sys.stderr, flush=True)
            self.failed = True
            self.on_fatal()
        except Exception:                     # a bug or the device failing: keep the traceback
            log.exception("错误：模型加载失败")
            self.failed = True
            self.on_fatal()

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def limits(self) -> dict:
        """The run-time bounds protocol.py's request models are validated against."""
        return {**self.settings.limits, "vocab": self.model.cfg.lm_vocab_size if self.model else None}

    def publish(self, events):
        """Engine thread -> event loop: hand each job its events."""
        def deliver():
            for job, kind, value in events:
                job.inbox.put_nowait((kind, value))
        self.loop.call_soon_threadsafe(deliver)

    def tally(self, key: str):
        """Count a decode event (from any thread)."""
        with self.decode_lock:
            self.decode_stats[key] += 1

    def decode_snapshot(self) -> dict:
        """requests: waiting for or in the pool; running: being decoded now; images: decoded so
        far; abandoned: requests whose client left while their images waited or decoded."""
        with self.decode_lock:
            s = dict(self.decode_stats)
        return {"requests": self.decoding, "running": s.pop("started", 0) - s.pop("finished", 0),
                "images": s.get("images", 0), "abandoned": s.get("abandoned", 0)}

    def require_ready(self):
        if not self.ready:
            raise busy("loading")
