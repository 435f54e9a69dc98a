"""Batched generation for the server: many requests share one forward pass per step.

One thread owns the model. Each loop it
  1. admits waiting jobs into free batch slots and prefills them together (image encoder + prompt),
  2. runs one decode step for every running sequence at once (shared KV cache, one forward),
  3. hands each job its new token; a job leaves the batch on its own (stop token, its own
     max_new_tokens, time limit, or cancelled because its client went away).

The batch is elastic: the KV cache is right-aligned (every row's newest token sits in the same
column, shorter histories are padded on the left and hidden by the key mask; positions are passed
explicitly), so newly prefilled jobs are merged in between two steps and a finished row is cut
out at once. The engine joins and cuts rows in one way for every language model: the cache that
lm.new_cache() returns is seen as stacked (L, B, H_kv, T, hd) keys/values (cache.stacked()) and
rebuilt from them (cache.from_stacked()), the built-in model.KVCache as well as the DynamicCache
of a Hugging Face LLM (hf_cache.py).

The engine knows nothing of HTTP: callers build a Job, submit() it, and receive events through
the `publish` callback, called from the engine thread once per step with [(job, kind, value)]:
("token", id) for streaming jobs and ("done", None) when a job ends (see job.finish_reason).
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time

import torch

from layout import positions_and_mask
from model import GROW, sample

log = logging.getLogger("engine")


class QueueFull(Exception):
    """The waiting queue is at its limit; the caller should answer 'busy, retry later'."""


class Job:
    """One generation request. ids: prompt token ids (image tokens included); pixels: the
    prompt's images (n, 3, H, W) in order, or None."""

    def __init__(self, ids, pixels=None, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, timeout=None, stream=False):
        self.ids, self.pixels = list(ids), pixels
        self.max_new_tokens, self.stream = max_new_tokens, stream
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed
        self.generator = None
        self.tokens: list[int] = []
        self.finish_reason = None           # stop | length | time_limit | cancelled | queue_timeout | error
        self.cancelled, self.tokens_at_cancel = False, None
        self.t_submit = time.monotonic()
        self.deadline = None if timeout is None else self.t_submit + timeout
        self.t_start = self.t_first = self.t_end = None

    def cancel(self):
        """Safe from any thread: the engine drops the job before its next step."""
        if not self.cancelled:
            self.tokens_at_cancel = len(self.tokens)
        self.cancelled = True

    def timings(self) -> dict:
        """Milliseconds: waiting for a slot, until the first token, in total; decode speed."""
        ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000, 1)
        decode_s = None if self.t_first is None or self.t_end is None else self.t_end - self.t_first
        tps = None if not decode_s or len(self.tokens) < 2 else round((len(self.tokens) - 1) / decode_s, 1)
        return {"queue_ms": ms(self.t_submit, self.t_start), "first_token_ms": ms(self.t_submit, self.t_first),
                "total_ms": ms(self.t_submit, self.t_end), "tokens_per_second": tps}


def weights_for_few_rows(model: torch.nn.Module):
    """Store each language-model weight as the transpose of an (in, out) array. A decode step
    multiplies a few rows (one per running request) by every weight; given the usual (out, in)
    layout MKL repacks the whole weight on each call once there are several rows, in this layout
    it reads it in place. Same values, same results: measured with engine steps at batch 8, the
    `small` preset takes 29 ms instead of 35 and `tiny` 2.7 instead of 2.9 (batch 1 unchanged)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.is_contiguous():
            m.weight.data = m.weight.data.t().contiguous().t()


class Engine:
    """stop_ids end a job (not part of its tokens); banned ids are never sampled (tokens that can
    not be part of an answer, such as <image> or <pad>); max_batch jobs decode together and up to
    max_queue more may wait for a slot."""

    def __init__(self, model, stop_ids, max_batch=16, max_queue=64, publish=None, banned=()):
        self.model, self.cfg = model, model.cfg
        weights_for_few_rows(model.lm)                  # the engine only ever decodes
        self.device = next(model.parameters()).device
        self.stop_ids = set(int(i) for i in stop_ids)
        self.banned = torch.tensor(sorted(banned), dtype=torch.long, device=self.device)  # never sampled
        self.max_batch, self.max_queue = max_batch, max_queue
        self.publish = publish or (lambda events: None)
        self.cv = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.closing = False
        # the running batch: one entry per cache row (None: finished, cut out by _compact)
        self.rows: list[Job | None] = []
        self.cache = self.key_mask = self.next_pos = self.last = None
        self.events = []
        self.stats = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ------------------------------------------------------------------ called from other threads

    def start(self):
        self.thread.start()
        return self

    def close(self):
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job):
        """Queue a job, or raise QueueFull when max_queue jobs already wait for a slot."""
        with self.cv:
            free = max(0, self.max_batch - self.stats["active"])
            if len(self.waiting) >= self.max_queue + free:
                self.stats["rejected"] += 1
                raise QueueFull
            self.waiting.append(job)
            self.stats["submitted"] += 1
            self.cv.notify()

    def snapshot(self) -> dict:
        with self.cv:
            s = dict(self.stats)
            s["waiting"] = len(self.waiting)
        s.setdefault("active", 0)
        s["mean_batch"] = round(s.get("rows_stepped", 0) / s["steps"], 2) if s.get("steps") else 0.0
        return s

    # ------------------------------------------------------------------ engine thread

    def _loop(self):
        while True:
            with self.cv:
                while not self.closing and not self.waiting and not self._running():
                    self.cv.wait(timeout=1.0)
                if self.closing:
                    for job in [*self.waiting, *self._running()]:
                        self._finish(job, "cancelled")
                    self.waiting.clear()
                    self._flush()
                    return
                new = self._admit()
            joined = None
            try:                                    # a failure here concerns the new jobs only
                with torch.inference_mode():
                    joined = self._prefill(new) if new else None
            except Exception:
                log.exception("prefill failed")
                for job in new:
                    if job.finish_reason is None:
                        self._finish(job, "error")
            try:
                with torch.inference_mode():
                    if joined:
                        self._merge(*joined)
                    if self._running():
                        self._decode()
            except Exception:                       # a bug or out of memory: fail this batch, keep serving
                log.exception("generation failed")
                for job in {*(joined[0] if joined else []), *self._running()} - {None}:
                    if job.finish_reason is None:
                        self._finish(job, "error")
                self.rows, self.cache = [], None
            with self.cv:
                self.stats["active"] = len(self._running())
            self._flush()

    def _running(self):
        return [j for j in self.rows if j is not None]

    def _admit(self) -> list[Job]:
        """Under the lock: drop cancelled/expired waiting jobs, take as many as fit."""
        now = time.monotonic()
        for job in list(self.waiting):
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                self.waiting.remove(job)
                self._finish(job, "cancelled" if job.cancelled else "queue_timeout")
        room = self.max_batch - len(self.rows)
        new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        self.stats["active"] = len(self._running()) + len(new)
        return new

    def _prefill(self, jobs: list[Job]):
        """Encode the new jobs' images and prompts in one left-padded batch and sample each one's
        first token. Returns _merge's arguments for the jobs that go on, or None."""
        now = time.monotonic()
        B, T = len(jobs), max(len(j.ids) for j in jobs)
        ids = torch.full((B, T), self.cfg.pad_token_id, dtype=torch.long)
        am = torch.zeros((B, T), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, T - len(job.ids):] = torch.tensor(job.ids)
            am[b, T - len(job.ids):] = 1
            job.t_start = now
            if job.temperature > 0:
                job.generator = torch.Generator(self.device)
                job.generator.manual_seed(job.seed if job.seed is not None else random.getrandbits(63))
        ids, am = ids.to(self.device), am.to(self.device)
        images = [j.pixels for j in jobs if j.pixels is not None]
        pixels = torch.cat(images).to(self.device) if images else None
        x = self.model.embed(ids, pixels)
        for job in jobs:
            job.pixels = None                              # encoded now; free the memory
        positions, mask = positions_and_mask(am, (B, T))
        cache = self.model.lm.new_cache(B, T + GROW)              # grows when full
        h = self.model.lm(x, positions.to(self.device), mask, cache)
        toks = self._sample(self.model.lm.logits(h[:, -1]).float(), jobs)
        keep = self._accept(jobs, toks)
        key_mask = am.bool()
        next_pos = positions[:, -1] + 1
        last = torch.tensor(toks, device=self.device)
        if not any(keep):
            return None
        return [j if k else None for j, k in zip(jobs, keep)], cache, key_mask, next_pos, last

    def _merge(self, jobs, cache, key_mask, next_pos, last):
        """Join prefilled rows (None: finished already) to the running batch, right-aligning both
        caches; an empty batch simply takes them."""
        if not self.rows:
            self.rows, self.cache, self.key_mask, self.next_pos, self.last = jobs, cache, key_mask, next_pos, last
            return
        parts = (self.cache.stacked(), cache.stacked())
        T = max(n for _, _, n in parts)
        L, _, H, _, hd = parts[0][0].shape
        B = len(self.rows) + len(jobs)
        k = parts[0][0].new_zeros(L, B, H, T + GROW, hd)    # spare columns: room for the next steps
        v = torch.zeros_like(k)
        mask = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        for rows, (pk, pv, n), m in zip((slice(0, len(self.rows)), slice(len(self.rows), B)), parts,
                                        (self.key_mask, key_mask)):
            k[:, rows, :, T - n:T] = pk[:, :, :, :n]
            v[:, rows, :, T - n:T] = pv[:, :, :, :n]
            mask[rows, T - n:] = m
        self.rows = self.rows + jobs
        self.cache = self.cache.from_stacked(k, v, T)
        self.key_mask = mask
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.last = torch.cat([self.last, last])

    def _decode(self):
        """One step for the whole batch: feed each row's last token, sample the next."""
        now = time.monotonic()
        for i, job in enumerate(self.rows):
            if job is not None and (job.cancelled or (job.deadline is not None and now > job.deadline)):
                self._finish(job, "cancelled" if job.cancelled else "time_limit")
                self.rows[i] = None
        self._compact()
        if not self._running():
            return
        B = len(self.rows)
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(B, 1)], 1)
        h = self.model.lm(self.model.lm.embed(self.last[:, None]), self.next_pos[:, None],
                          self.key_mask[:, None, None, :], self.cache)
        self.next_pos = self.next_pos + 1
        toks = self._sample(self.model.lm.logits(h[:, -1]).float(), self.rows)
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(self._running())
        keep = self._accept(self.rows, toks)
        self.rows = [j if k else None for j, k in zip(self.rows, keep)]
        self.last = torch.tensor(toks, device=self.device)
        self._compact()

    def _compact(self):
        """Cut out finished rows and the left columns no row needs any more."""
        if not self._running():
            self.rows, self.cache = [], None
            return
        if None not in self.rows:
            return
        idx = torch.tensor([i for i, j in enumerate(self.rows) if j is not None], device=self.device)
        self.rows = [j for j in self.rows if j is not None]
        self.key_mask = self.key_mask.index_select(0, idx)
        self.next_pos, self.last = self.next_pos.index_select(0, idx), self.last.index_select(0, idx)
        first = int(self.key_mask.any(0).int().argmax())        # leftmost column some row still uses
        k, v, n = self.cache.stacked()
        self.cache = self.cache.from_stacked(k.index_select(1, idx)[:, :, :, first:],
                                             v.index_select(1, idx)[:, :, :, first:], n - first)
        self.key_mask = self.key_mask[:, first:]

    def _sample(self, logits, jobs) -> list[int]:
        if len(self.banned):
            logits[:, self.banned] = float("-inf")
        toks = logits.argmax(-1)
        for i, job in enumerate(jobs):
            if job.temperature > 0:
                toks[i] = sample(logits[i:i + 1], job.temperature, job.top_k, job.top_p, job.generator)[0]
        return toks.tolist()

    def _accept(self, jobs, toks) -> list[bool]:
        """Record each job's new token; return which jobs continue."""
        now = time.monotonic()
        keep = []
        for job, tok in zip(jobs, toks):
            if job.t_first is None:
                job.t_first = now
            if tok in self.stop_ids:
                self._finish(job, "stop")
                keep.append(False)
                continue
            job.tokens.append(tok)
            self.stats["tokens"] += 1
            if job.stream:
                self.events.append((job, "token", tok))
            if len(job.tokens) >= job.max_new_tokens:
                self._finish(job, "length")
            keep.append(job.finish_reason is None)
        return keep

    def _finish(self, job: Job, reason: str):
        job.finish_reason, job.t_end = reason, time.monotonic()
        self.stats[{"stop": "completed", "length": "completed"}.get(reason, reason)] += 1
        if job.tokens_at_cancel is not None:          # decoded after cancel(): at most the step under way
            self.stats["tokens_after_cancel"] += len(job.tokens) - job.tokens_at_cancel
        self.events.append((job, "done", None))

    def _flush(self):
        if self.events:
            events, self.events = self.events, []
            self.publish(events)
