"""Train / val / test splits of the scene world: disjoint ranges of sample seeds.

Sample ``i`` of split ``s`` asked for with ``seed`` is generated from ``SPLITS[s] * SPLIT_SPAN + seed + i``,
so whatever seeds a user or a trainer picks, a test sample can never be generated for training.
"""

from __future__ import annotations

from uniref.data.sample import Sample
from uniref.data.tasks import TaskConfig, generate
from uniref.errors import DataError

SPLIT_SPAN = 1 << 40  # seeds per split: far more samples than any run draws
SPLITS = {"train": 0, "val": 1, "test": 2}


def split_seed(split: str, seed: int, index: int) -> int:
    """The seed of sample ``index`` of ``split`` when the user asks for ``--seed seed``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    if not 0 <= seed + index < SPLIT_SPAN:
        raise DataError(f"--seed {seed} with {index + 1} samples leaves the split's seed range [0, 2^40)")
    return SPLITS[split] * SPLIT_SPAN + seed + index


def split_samples(split: str, n: int, config: TaskConfig | None = None, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``split`` from ``seed`` on: the same samples ``uniref data make`` writes."""
    return [generate(split_seed(split, seed, i), config) for i in range(n)]
