"""Resumable sample streams for training: the scene world generated on the fly, or a dataset.

A stream hands out samples in a fixed order that depends only on its seed, and its whole position
fits in a small dict (``state_dict``), so a resumed run sees exactly the samples the uninterrupted
run would have seen. With several processes, each takes every ``world``-th sample of the global
order starting at its ``rank``: together they see the same global batches as one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from uniref.data import SizeRange, TaskConfig, generate, parse_tasks
from uniref.data.sample import Sample
from uniref.errors import ConfigError, DataError


class SampleStream(Protocol):
    def take(self, n: int) -> tuple[list[int], list[Sample]]:
        """This rank's next ``n`` samples and their indices in the global order (which seed their noise)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SceneStream:
    """Sample ``n`` of the global order is ``generate(seed_offset + n)`` under a task family drawn
    from ``task_mix`` by a generator seeded with the same number."""

    def __init__(
        self,
        task_mix: dict[str, float],
        max_refs: int,
        size_range: str,
        seed_offset: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        try:
            sizes = SizeRange.parse(size_range)
            self.configs = [TaskConfig(parse_tasks(name), max_refs, sizes) for name in task_mix]
        except ValueError as exc:
            raise ConfigError(f"data: {exc}") from None
        weights = np.array(list(task_mix.values()), dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(f"data.task_mix {task_mix}: weights must be >= 0 with a positive sum")
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed_offset = seed_offset
        self.rank, self.world = rank, world
        self.position = 0  # global sample index of this rank's next sample, before the rank offset

    def sample(self, index: int) -> Sample:
        seed = self.seed_offset + index
        family = int(np.searchsorted(self.cumulative, np.random.default_rng(seed).random(), side="right"))
        return generate(seed, self.configs[min(family, len(self.configs) - 1)])

    def take(self, n: int) -> tuple[list[int], list[Sample]]:
        """This rank's share of the next ``n * world`` samples of the global order."""
        indices = [self.position + i * self.world + self.rank for i in range(n)]
        self.position += n * self.world
        return indices, [self.sample(i) for i in indices]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class DatasetStream:
    """A dataset (JSONL manifest, webdataset shards or HF parquet) read in a seeded order that is
    reshuffled every epoch. Rows that fail validation are counted by the loader, never used."""

    def __init__(self, source: str | Path, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        from uniref.data.formats import LoadReport, iter_samples

        self.report = LoadReport()
        self.samples = list(iter_samples(source, self.report, streaming=False))
        if not self.samples:
            raise DataError(f"{source}: no usable samples ({self.report.bad} bad rows of {self.report.rows})")
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))

    def _next_global(self) -> Iterator[tuple[int, int]]:
        """(global draw number, row) pairs: draws count across epochs, rows repeat."""
        while True:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            yield self.epoch * len(self._order) + self.index, int(self._order[self.index])
            self.index += 1

    def take(self, n: int) -> tuple[list[int], list[Sample]]:
        it = self._next_global()
        indices, chosen = [], []
        for _ in range(n):
            draw, row = [next(it) for _ in range(self.world)][self.rank]
            indices.append(draw)
            chosen.append(self.samples[row])
        return indices, chosen

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def build_stream(
    source: str,
    task_mix: dict[str, float],
    max_refs: int,
    size_range: str,
    seed_offset: int,
    rank: int = 0,
    world: int = 1,
) -> SampleStream:
    """``scenes`` -> :class:`SceneStream`; anything else is a dataset path -> :class:`DatasetStream`."""
    if source == "scenes":
        return SceneStream(task_mix, max_refs, size_range, seed_offset, rank, world)
    return DatasetStream(source, seed_offset, rank, world)
