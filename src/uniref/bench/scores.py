"""The published score formulas, one function each, and the aggregations the benchmarks report.

Judge scores arrive on each benchmark's own scale (0-10 for OmniContext, MICo-Bench and GEdit-Bench's
VIEScore, 1-5 for ImgEdit) and are kept on it, so a table compares directly with the published ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def omnicontext_score(pf: float, sc: float) -> float:
    """OmniContext per sample: √(PF · SC), prompt following and subject consistency on 0-10."""
    return math.sqrt(pf * sc)


def mico_score(pf: float, sr: float, naturalness: float, artifacts: float, w: float = 1.0) -> dict[str, float]:
    """MICo-Bench per sample: SC = √(PF · SR), PQ = √(naturalness · artifacts), score = W · √(SC · PQ)."""
    sc = math.sqrt(pf * sr)
    pq = math.sqrt(naturalness * artifacts)
    return {"SC": sc, "PQ": pq, "score": w * math.sqrt(sc * pq)}


def viescore(sc_scores: Sequence[float], pq_scores: Sequence[float]) -> dict[str, float]:
    """GEdit-Bench's VIEScore per sample: SC = min of the semantic scores (editing success, over-editing),
    PQ = min of the perceptual ones (naturalness, artifacts), O = √(SC · PQ); all on 0-10."""
    sc, pq = min(sc_scores), min(pq_scores)
    return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}


def imgedit_score(scores: Sequence[float]) -> float:
    """ImgEdit per sample: the mean of its rubric's three 1-5 scores."""
    return sum(scores) / len(scores)


Row = tuple[dict[str, Any], dict[str, float] | None]  # (item fields: task_type, language, k...; scores or unscored)


def group_means(rows: Iterable[Row], by: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, float]]:
    """Per group: the mean of every score over its scored rows, ``n`` (rows) and ``unscored`` (rows the
    judge could not score: counted, left out of the means, never given a number)."""
    groups: dict[Any, list[dict[str, float] | None]] = defaultdict(list)
    for item, scores in rows:
        groups[by(item)].append(scores)
    table: dict[Any, dict[str, float]] = {}
    for group, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        scored = [m for m in members if m is not None]
        means: dict[str, float] = {}
        for name in sorted({name for m in scored for name in m}):  # a score some rows lack is averaged where given
            values = [m[name] for m in scored if name in m]
            means[name] = sum(values) / len(values)
        table[group] = {**means, "n": len(members), "unscored": len(members) - len(scored)}
    return table


def mean_over_groups(table: dict[Any, dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """The macro mean: each group (task type) weighs the same, whatever its size — how OmniContext and
    ImgEdit report their overall numbers. Groups with nothing scored are left out (and visible as such)."""
    out: dict[str, float] = {}
    for name in names:
        values = [row[name] for row in table.values() if name in row]
        if values:
            out[name] = sum(values) / len(values)
    return {
        **out,
        "n": sum(row["n"] for row in table.values()),
        "unscored": sum(row["unscored"] for row in table.values()),
    }


def mean_over_samples(rows: Iterable[Row]) -> dict[str, float]:
    """The micro mean over every scored sample."""
    return group_means(rows, lambda item: "all").get("all", {"n": 0, "unscored": 0})
