"""Training samples as a pure function of their position, loaded ahead by a worker process.

A *source* maps a global sample index to a sample: the scene world generates sample ``n`` from seed
``seed_offset + n``; a dataset reads row ``perm_e[n mod N]`` where ``perm_e`` is the seeded
permutation of epoch ``e = n // N``. Step ``s`` of a run uses the global indices
``[Σ_{t<s} batch(t), Σ_{t≤s} batch(t))``, and process ``r`` of ``w`` takes every ``w``-th of them
from ``r``. So the data of a step depends on nothing but the config: resuming at step ``s``, or
running on any number of processes, sees exactly the samples of one uninterrupted run, and a
``torch.utils.data.DataLoader`` worker can generate them ahead while the model trains.
"""

from __future__ import annotations

import bisect
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.utils.data

from uniref.data import SizeRange, TaskConfig, generate, parse_tasks
from uniref.data.sample import Sample
from uniref.data.splits import split_seed
from uniref.errors import ConfigError, DataError
from uniref.train.config import DataSection, StageSection


class SampleSource(Protocol):
    def sample(self, index: int) -> Sample: ...


def mix_entry(name: str, max_refs: int) -> tuple[str, int]:
    """A ``task_mix`` key and the K it may reach: ``"compose@2"`` is ``compose`` with at most 2
    references (a curriculum can keep K = 2 compositions in a stage that reaches K = 6)."""
    tasks, _, cap = name.partition("@")
    if not cap:
        return tasks, max_refs
    if not cap.isdigit() or int(cap) < 1:
        raise ConfigError(f"data.task_mix key {name!r}: after '@' give the largest K, e.g. 'compose@2'")
    return tasks, min(int(cap), max_refs)


class SceneSource:
    """Sample ``n`` is ``generate(seed_offset + n)`` (in the train seed range) under a task family
    drawn from ``task_mix`` by a generator seeded with the same number."""

    def __init__(self, task_mix: dict[str, float], max_refs: int, size_range: str, seed_offset: int = 0) -> None:
        try:
            sizes = SizeRange.parse(size_range)
            entries = [mix_entry(name, max_refs) for name in task_mix]
            self.configs = [TaskConfig(parse_tasks(tasks), k, sizes) for tasks, k in entries]
        except ValueError as exc:
            raise ConfigError(f"data: {exc}") from None
        weights = np.array(list(task_mix.values()), dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(f"data.task_mix {task_mix}: weights must be >= 0 with a positive sum")
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed_offset = seed_offset

    def sample(self, index: int) -> Sample:
        seed = split_seed("train", self.seed_offset, index)  # never a val or test seed
        family = int(np.searchsorted(self.cumulative, np.random.default_rng(seed).random(), side="right"))
        return generate(seed, self.configs[min(family, len(self.configs) - 1)])


class DatasetSource:
    """A dataset read into memory (rows failing validation are counted by the loader and skipped),
    visited in a seeded order reshuffled every epoch."""

    def __init__(self, source: str | Path, seed: int = 0) -> None:
        from uniref.data.formats import LoadReport, iter_samples

        self.report = LoadReport()
        self.samples = list(iter_samples(source, self.report, streaming=False))
        if not self.samples:
            raise DataError(f"{source}: no usable samples ({self.report.bad} bad rows of {self.report.rows})")
        self.seed = seed

    def sample(self, index: int) -> Sample:
        epoch, offset = divmod(index, len(self.samples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return self.samples[int(order[offset])]


def build_source(data: DataSection) -> SampleSource:
    """``scenes`` -> :class:`SceneSource`; anything else is a dataset path -> :class:`DatasetSource`."""
    if data.source == "scenes":
        return SceneSource(data.task_mix, data.max_refs, data.size_range, data.seed_offset)
    return DatasetSource(data.source, data.seed_offset)


class StagedSource:
    """Stages that set their own ``task_mix`` or ``max_refs`` (a curriculum) draw from their own
    scene source; sample ``n`` belongs to the stage whose steps hold it, so it stays a pure
    function of ``n`` and resuming sees the same data."""

    def __init__(self, sources: list[SampleSource], first_index: list[int]) -> None:
        self.sources, self.first_index = sources, first_index

    def sample(self, index: int) -> Sample:
        stage = max(0, bisect.bisect_right(self.first_index, index) - 1)
        return self.sources[stage].sample(index)


def build_staged_source(data: DataSection, stages: Sequence[StageSection]) -> SampleSource:
    """:func:`build_source`, or a :class:`StagedSource` when a stage overrides the task mix or K."""
    if not any(s.task_mix is not None or s.max_refs is not None for s in stages):
        return build_source(data)
    if data.source != "scenes":
        raise ConfigError("stages: task_mix and max_refs apply to generated scenes (data.source: scenes) only")
    sources: list[SampleSource] = []
    first, start = [], 0
    for stage in stages:
        overrides = {"task_mix": stage.task_mix or data.task_mix, "max_refs": stage.max_refs or data.max_refs}
        sources.append(build_source(data.model_copy(update=overrides)))
        first.append(start)
        start += stage.steps * stage.batch_size
    return StagedSource(sources, first)


class StepBatches(torch.utils.data.Sampler[list[int]]):
    """Global sample indices of this process's share of each step from ``start`` to ``stop``."""

    def __init__(self, batch_size_at: Callable[[int], int], start: int, stop: int, rank: int, world: int) -> None:
        self.batch_size_at, self.start, self.stop = batch_size_at, start, stop
        self.rank, self.world = rank, world

    def first_index(self, step: int) -> int:
        return sum(self.batch_size_at(t) for t in range(step))

    def step_of(self, index: int) -> int:
        """The step whose samples include global ``index``."""
        step, end = 0, self.batch_size_at(0)
        while index >= end:
            step += 1
            end += self.batch_size_at(step)
        return step

    def __iter__(self) -> Iterator[list[int]]:
        base = self.first_index(self.start)
        for step in range(self.start, self.stop):
            size = self.batch_size_at(step)
            yield list(range(base + self.rank, base + size, self.world))
            base += size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _Indexed(torch.utils.data.Dataset[tuple[int, Sample]]):
    def __init__(self, source: SampleSource) -> None:
        self.source = source

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        return index, self.source.sample(index)

    def __len__(self) -> int:  # unbounded: indices come from the batch sampler
        return 1 << 62


class _Collate:
    """(indices, samples, prepared): ``prepare(indices, samples)`` runs here, in the worker, when
    given (the frozen encoders' work moved off the trainer's cores)."""

    def __init__(self, prepare: Callable[[list[int], list[Sample]], Any] | None) -> None:
        self.prepare = prepare

    def __call__(self, items: list[tuple[int, Sample]]) -> tuple[list[int], list[Sample], Any]:
        indices, samples = [i for i, _ in items], [s for _, s in items]
        return indices, samples, self.prepare(indices, samples) if self.prepare else None


def _init_worker(worker_id: int) -> None:
    """SIGTERM/SIGINT sent to the whole process group (``timeout``, Slurm, ``docker stop``, Ctrl-C)
    would kill a worker mid-batch, and the DataLoader then raises in the trainer before it can
    checkpoint; the trainer stops its workers itself once it has saved. One thread: the worker's
    encoding must not compete with the trainer's threads."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def step_loader(
    source: SampleSource,
    batches: StepBatches,
    workers: int,
    prepare: Callable[[list[int], list[Sample]], Any] | None = None,
) -> Iterator[tuple[list[int], list[Sample], Any]]:
    """(global indices, samples, prepared) for each step, generated ``workers`` processes ahead (0:
    inline); ``prepared`` is ``prepare(indices, samples)`` computed by the worker, or None."""
    return iter(
        torch.utils.data.DataLoader(
            _Indexed(source),
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=_Collate(prepare),
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
            worker_init_fn=_init_worker if workers else None,
        )
    )
