"""Scene-world generation throughput: samples per second by task and K, on this machine's CPU.

    python benchmarks/bench_data.py [--seconds 2] [--size-range 48:160]

Each row generates samples (references + target, rendered) for about ``--seconds`` of wall time in
one process; file writing is not included (``uniref data make`` adds PNG encoding). Scoring one
output with the exact metrics (:class:`uniref.rewards.Scorer`) is timed too, as RL calls it per image.
"""

from __future__ import annotations

import argparse
import time

from uniref.data.tasks import COMPOSE_TASKS, EDIT_TASKS, MIN_REFS, SizeRange, TaskConfig, generate
from uniref.rewards import Scorer

COMPOSE_KS = (2, 3, 5, 10)


def _rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(n)
        n += 1
    return n / (time.perf_counter() - start)


def _fixed_k(task: str, k: int, sr: SizeRange) -> TaskConfig:
    return TaskConfig(tasks=(task,), max_refs=k, size_range=sr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--size-range", default="48:160")
    args = parser.parse_args()
    sr = SizeRange.parse(args.size_range)
    rows: list[tuple[str, str, float, float]] = []
    for task in EDIT_TASKS:
        cfg = _fixed_k(task, 1, sr)
        rows.append((task, "1", _rate(lambda i, c=cfg: generate(i, c), args.seconds), _score_rate(cfg, args.seconds)))
    for task in COMPOSE_TASKS:
        for k in COMPOSE_KS:
            if k < MIN_REFS[task] or (task == "conflict" and k > 4):
                continue
            # max_refs=k with K drawn in [min, k]: keep only samples with exactly K by seeding until one fits.
            seeds = [s for s in range(2000) if generate(s, _fixed_k(task, k, SizeRange(8, 8))).k == k][:50]
            cfg = _fixed_k(task, k, sr)
            rate = _rate(lambda i, c=cfg, ss=seeds: generate(ss[i % len(ss)], c), args.seconds)
            rows.append((task, str(k), rate, _score_rate(cfg, args.seconds, seeds)))
    mixed = TaskConfig(max_refs=4, size_range=sr)
    rows.append(
        (
            "mixed (edit,compose; max K 4)",
            "1-4",
            _rate(lambda i: generate(i, mixed), args.seconds),
            _score_rate(mixed, args.seconds),
        )
    )
    print("| task | K | samples/s | scores/s |")
    print("|---|---|---:|---:|")
    for task, k, rate, srate in rows:
        print(f"| {task} | {k} | {rate:.1f} | {srate:.0f} |")


def _score_rate(cfg: TaskConfig, seconds: float, seeds: list[int] | None = None) -> float:
    samples = [generate(s, cfg) for s in (seeds or range(10))[:10]]
    scorers = [Scorer(s) for s in samples]
    return _rate(lambda i: scorers[i % len(scorers)](samples[(i + 1) % len(samples)].target), seconds / 2)


if __name__ == "__main__":
    main()
