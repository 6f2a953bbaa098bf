"""The request batcher: concurrent edit requests become packed pipeline calls on one worker thread.

A request waits at most ``max_wait`` seconds after it arrives; then the oldest request and every later
one that can share its call (same steps, guidance, noise level, budget and plan mode: the pipeline takes those once
per call; K, sizes, seeds and instructions may all differ) run as one :meth:`EditPipeline.generate`
call of at most ``max_batch`` samples. SELF makes that cheap: every request's references fit one
budget, so samples of any K pack densely into rows. Request ``j`` keeps its own seeds, so its images
are those it would get alone (the pipeline seeds each sample on its own).

The queue is bounded (``submit`` raises :class:`QueueFull`, which the app answers with 429 and
``Retry-After``); a request whose client went away (its future cancelled) is dropped before its batch
runs; :meth:`Batcher.close` stops accepting, runs what is queued, then ends the thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from uniref.budget import Plan, PlanMode, Size
from uniref.errors import UniRefError
from uniref.pipeline import EditPipeline

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; the client should retry later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(frozen=True)
class EditJob:
    """One request: an instruction, its K references and how to sample ``n`` images from it."""

    instruction: str
    refs: list[Image.Image]
    size: Size | None = None
    n: int = 1
    seed: int = 0  # image i of the request uses seed + i, as the pipeline numbers a batch
    steps: int | None = None
    guidance: float | None = None
    noise_level: float | None = None  # the SDE sampler's (0: Euler); None: the model's
    budget: int | str | None = None  # reference budget as the pipeline takes it (an int is a side); None: native
    mode: PlanMode = PlanMode.GLOBAL
    attention: bool = False  # also return the per-reference attention summary (if the model records it)

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        return (self.steps, self.guidance, self.noise_level, self.budget, self.mode)


@dataclass
class JobResult:
    """What one request gets back from its batch."""

    images: list[Image.Image]
    plan: Plan
    batch_size: int  # samples in the pipeline call that served it
    queue_seconds: float  # from submit to the start of its batch
    seconds: dict[str, float]  # encode, denoise, decode of that call
    attention: list[dict[str, Any]] | None = None  # per image: uniref.explain.summarise_attention + "summary"


@dataclass
class _Pending:
    job: EditJob
    future: Future[JobResult]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """One pipeline call, for metrics: samples, requests, image tokens (targets + references)."""

    samples: int
    requests: int
    tokens: int
    seconds: float


class Batcher:
    """Runs :class:`EditJob` s in packed pipeline calls on one daemon thread (see the module docstring)."""

    def __init__(
        self,
        pipe: EditPipeline,
        *,
        max_batch: int = 8,
        max_wait: float = 0.025,
        max_queue: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="uniref-batcher", daemon=True)
        self._started = False

    # --- the request side ---------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        with self._cond:
            return len(self._queue)

    @property
    def accepting(self) -> bool:
        return not self._closing

    def start(self) -> Batcher:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def submit(self, job: EditJob) -> Future[JobResult]:
        """Queue ``job``; its future resolves to a :class:`JobResult` or raises what the call raised."""
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (the limit); retry shortly")
            pending = _Pending(job, Future())
            self._queue.append(pending)
            self._cond.notify_all()
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, finish everything queued, and end the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._started:
            self._thread.join(timeout)
        else:
            for pending in self._take_all():
                pending.future.cancel()

    # --- the worker side ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for the oldest request's deadline (or a full batch), then take what shares its call."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while not self._closing and self._samples_like(first.job.key) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take(first.job.key)

    def _samples_like(self, key: tuple[Any, ...]) -> int:
        return sum(p.job.n for p in self._queue if p.job.key == key and not p.future.cancelled())

    def _take(self, key: tuple[Any, ...]) -> list[_Pending]:
        """Oldest first, the requests with ``key`` that fit in ``max_batch`` samples (a request with
        ``n > max_batch`` runs alone rather than never); cancelled ones are dropped here."""
        taken: list[_Pending] = []
        samples = 0
        for pending in list(self._queue):
            if pending.job.key != key:
                continue
            if pending.future.cancelled():
                self._queue.remove(pending)
                self._dropped()
                continue
            if taken and samples + pending.job.n > self.max_batch:
                continue
            self._queue.remove(pending)
            if not pending.future.set_running_or_notify_cancel():  # cancelled just now
                self._dropped()
                continue
            taken.append(pending)
            samples += pending.job.n
            if samples >= self.max_batch:
                break
        return taken

    def _take_all(self) -> list[_Pending]:
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
        return items

    def _dropped(self) -> None:
        if self._on_drop is not None:
            self._on_drop()

    def _execute(self, batch: list[_Pending]) -> None:
        try:
            results = self.run_jobs([p.job for p in batch], [p.enqueued for p in batch])
        except UniRefError as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One request's input broke the shared call: run each alone so only that one fails.
            for pending in batch:
                try:
                    pending.future.set_result(self.run_jobs([pending.job], [pending.enqueued])[0])
                except Exception as single:  # noqa: BLE001 - handed to the request, which maps it to 4xx/500
                    pending.future.set_exception(single)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: every request of the call gets it (500, logged)
            log.exception("pipeline call of %d request(s) failed", len(batch))
            for pending in batch:
                pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)

    def run_jobs(self, jobs: list[EditJob], enqueued: list[float]) -> list[JobResult]:
        """Run ``jobs`` (equal keys) as one pipeline call and split the result per request."""
        start = time.monotonic()
        first = jobs[0]
        instructions, refs, sizes, seeds = [], [], [], []
        for job in jobs:
            for i in range(job.n):
                instructions.append(job.instruction)
                refs.append(job.refs)
                sizes.append(job.size)
                seeds.append(job.seed + i)
        recorder = getattr(self.pipe.model, "record_attention", None)
        want_attention = recorder is not None and any(job.attention for job in jobs)
        with _quiet_warnings(), recorder() if want_attention else contextlib.nullcontext() as attention:
            result = self.pipe.generate(
                instructions,
                refs,
                sizes,
                steps=first.steps,
                guidance=first.guidance,
                noise_level=first.noise_level,
                seed=seeds,
                budget=first.budget,
                mode=first.mode,
                progress=False,
            )
        seconds = {k: v for k, v in result.timings.as_dict().items() if k in ("encode", "denoise", "decode")}
        token_pixels = self.pipe.model.spec.token_pixels
        tokens = sum(sum(p.tokens(token_pixels)) for p in result.ref_plans) + sum(
            t.area // token_pixels**2 for t in result.target_sizes
        )
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(instructions), len(jobs), tokens, time.monotonic() - start))
        out, offset = [], 0
        for job, queued in zip(jobs, enqueued, strict=True):
            span = range(offset, offset + job.n)
            summaries = [_attention_summary(attention, j) for j in span] if want_attention and job.attention else None
            out.append(
                JobResult(
                    images=[result.images[j] for j in span],
                    plan=result.ref_plans[offset],
                    batch_size=len(instructions),
                    queue_seconds=start - queued,
                    seconds=dict(seconds),
                    attention=summaries,
                )
            )
            offset += job.n
        return out


def _attention_summary(log_: Any, sample: int) -> dict[str, Any]:
    from uniref.explain import summarise_attention, summary_line

    summary = summarise_attention(log_.mean(sample))
    summary["summary"] = summary_line(summary)
    return summary


_warned: set[str] = set()
# Distinct warnings logged at most: the tiny model's name the user's words, so an unbounded set would
# grow with every new request.
MAX_DISTINCT_WARNINGS = 1000


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Model warnings (e.g. words the tiny model does not know) go to the log once each, not to stderr
    for every batch (this thread is the only one that runs the pipeline)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                text = str(w.message)
                if text not in _warned and len(_warned) < MAX_DISTINCT_WARNINGS:
                    _warned.add(text)
                    log.warning("%s", text)
