"""Reward sources for MSGRPO: one protocol, several implementations.

A source scores a batch of (sample, output) pairs and returns, per pair, a dict of source name → reward in
[0, 1], or ``None`` when that pair could not be scored. Names follow :mod:`uniref.train.grpo`: ``ref_1`` ..
``ref_K`` (one per reference, in picture order), ``instruction`` (instruction following / multi-source
integration), ``quality``. A failed call is never scored 0 — a 0 would be a confident "bad" and push the policy
away from an output nobody judged; the trainer drops ``None`` samples from their group and counts them.

Implementations:

* :class:`SceneRewards` — the exact scene-world metrics (:mod:`uniref.rewards.metrics`), in process.
* :class:`uniref.rewards.remote.HTTPRewardSource` — any source served by :mod:`uniref.rewards.server`.
* :class:`uniref.rewards.judge.VLMJudge` — an OpenAI-compatible VLM judge (vLLM, SGLang, hosted).
* :class:`MergedRewards` — several sources side by side (e.g. exact metrics and a judge), names kept apart.

Sources that talk over the network count what happened in a :class:`RewardStats` (``source.stats``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, TypeVar, runtime_checkable

from PIL import Image

from uniref.data.sample import Sample
from uniref.rewards.metrics import Scorer, headline_score

log = logging.getLogger(__name__)

T = TypeVar("T")
ScoreDict = dict[str, float]


@runtime_checkable
class RewardSource(Protocol):
    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        """One entry per (sample, output) pair: source name → reward in [0, 1], or None if it failed."""
        ...


@dataclass
class RewardStats:
    """Counters of a networked source (thread-safe). ``failed`` samples were returned as None, never as 0."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0  # requests that repeated a failed one
    scored: int = 0  # samples returned with scores
    failed: int = 0  # samples returned as None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for one reward call."""

    max_retries: int = 3  # retries after the first attempt; the call is tried at most 1 + max_retries times
    backoff: float = 0.5  # seconds before the first retry, doubled each retry (a busy server gets room)
    max_backoff: float = 8.0  # cap on one wait
    timeout: float = 60.0  # seconds for one HTTP request (a VLM judging several images can take tens of seconds)

    def delay(self, retry: int) -> float:
        return min(self.backoff * 2**retry, self.max_backoff)


class RetryableError(Exception):
    """A reward call failed in a way that may pass on another try (timeout, 5xx, unparsable answer)."""


class FatalCallError(Exception):
    """A reward call failed in a way that another try will not fix (4xx: our request is wrong)."""


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, stats: RewardStats, what: str) -> T | None:
    """``fn()`` until it returns, at most ``1 + policy.max_retries`` times; None when every try failed.

    ``fn`` raises :class:`RetryableError` (or a transport exception from httpx, which callers convert) to ask
    for another try and :class:`FatalCallError` to give up at once. Each attempt counts in ``stats.requests``.
    """
    for attempt in range(policy.max_retries + 1):
        if attempt:
            stats.add(retries=1)
            time.sleep(policy.delay(attempt - 1))
        stats.add(requests=1)
        try:
            return fn()
        except FatalCallError as e:
            log.warning("%s failed, not retried: %s", what, e)
            return None
        except RetryableError as e:
            log.info("%s attempt %d/%d failed: %s", what, attempt + 1, policy.max_retries + 1, e)
    log.warning("%s failed after %d attempts", what, policy.max_retries + 1)
    return None


OVERALL = "overall"


def with_overall(scores: ScoreDict | None) -> ScoreDict | None:
    """``scores`` plus the headline ``overall`` (:func:`~uniref.rewards.metrics.headline_score`), for any
    source that gives ``instruction`` and ``ref_*``: a reward that pays for it cannot be won by copying
    a reference or by a blank image."""
    if scores is None or OVERALL in scores or "instruction" not in scores:
        return scores
    refs = [v for k, v in scores.items() if k.startswith("ref_")]
    if not refs:
        return scores
    return {**scores, OVERALL: headline_score(scores["instruction"], min(refs))}


def ref_key(k: int) -> str:
    """Source name of reference k (0-based): ``ref_1`` for the first picture."""
    return f"ref_{k + 1}"


class SceneRewards:
    """The exact scene-world metrics as a reward source: ``ref_1..ref_K``, ``instruction``, ``quality``.

    Per-sample work (target analysis) is shared by every output of the same sample object in a batch, so a
    group of G outputs costs one :class:`~uniref.rewards.metrics.Scorer`. Samples without a scene-world spec
    are a usage error and raise (ValueError), not a failed call.
    """

    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        check_lengths(samples, outputs)
        scorers: dict[int, Scorer] = {}
        results: list[ScoreDict | None] = []
        for sample, output in zip(samples, outputs, strict=True):
            scorer = scorers.get(id(sample))
            if scorer is None:
                scorer = scorers[id(sample)] = Scorer(sample)
            s = scorer(output)
            results.append(
                {
                    **{ref_key(k): float(r) for k, r in enumerate(s.ref_scores)},
                    "instruction": s.instruction,
                    "quality": s.quality,
                }  # fmt: skip
            )
        return results


class MergedRewards:
    """Several sources side by side: each source's names get its prefix (``"judge/"`` + ``"ref_1"``...).

    A pair is None if any source failed on it: the aggregator needs every source of a group. With an empty
    prefix a source's names are kept as they are (one source may own the plain ``ref_k`` names the
    reconciling aggregator reads); two sources producing the same name is an error.
    """

    def __init__(self, sources: dict[str, RewardSource]) -> None:
        self.sources = sources

    def score(self, samples: list[Sample], outputs: list[Image.Image]) -> list[ScoreDict | None]:
        merged: list[ScoreDict | None] = [{} for _ in samples]
        for prefix, source in self.sources.items():
            for i, part in enumerate(source.score(samples, outputs)):
                current = merged[i]
                if current is None:
                    continue
                if part is None:
                    merged[i] = None
                    continue
                for name, value in part.items():
                    key = prefix + name
                    if key in current:
                        raise ValueError(f"reward name {key!r} produced by two sources: give them distinct prefixes")
                    current[key] = value
        return merged


def check_lengths(samples: Sequence[Sample], outputs: Sequence[Image.Image]) -> None:
    if len(samples) != len(outputs):
        raise ValueError(f"{len(samples)} samples but {len(outputs)} outputs: pass one sample per output")
