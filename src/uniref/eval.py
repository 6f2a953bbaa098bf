"""Evaluation core: run a pipeline over samples, score each output with the exact metrics, aggregate.

``evaluate(pipe, samples)`` is what ``uniref eval``, the SFT trainer's validation pass and the MSGRPO
evaluation all call, so the numbers they report cannot drift apart. It knows nothing of the CLI.

Aggregation (every score in [0, 1], see :mod:`uniref.rewards.metrics`):

* ``ref_consistency``: per sample the mean over its references, then the mean over samples. Averaging
  per sample first weighs every sample equally whatever its K, so a few K = 10 compositions do not drown
  the single edits (a mean over all references pooled would).
* ``worst_ref_consistency``: the mean over samples of the worst reference (what MSGRPO protects).
* ``overall``: the mean over samples of ``√(instruction · worst reference)`` (the headline score, see
  :attr:`SampleScore.overall`).
* ``instruction_accuracy``, ``quality``: means over samples.
* each also ``by_task`` and ``by_k`` (same keys plus ``n``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from uniref.budget import PlanMode
from uniref.data.sample import Sample
from uniref.rewards.metrics import SampleScore, Scorer
from uniref.viz import SheetRow, draw_sheet

METRICS = ("ref_consistency", "worst_ref_consistency", "instruction_accuracy", "quality")
HEADLINE = ("overall", *METRICS)  # what summaries and tables report
# Trivial outputs every results table is read against (see :func:`baseline_output`).
BASELINES = ("copy_first", "copy_last", "grey", "other_target")
GREY = (128, 128, 128)
WORST_CASES = 8  # rows of the worst-case grid
FAILED_BELOW = 0.5  # a sample whose overall score is below this failed
LOST_BELOW = 0.5  # ... and lost its least consistent reference if that one scores below this


class _Pipeline(Protocol):
    def generate(self, instruction: Any, refs: Any, size: Any = None, **kwargs: Any) -> Any: ...


@dataclass
class SampleRecord:
    """One evaluated sample: where it came from and its exact scores."""

    index: int  # position in the evaluated sequence
    task: str
    k: int
    score: SampleScore
    roles: list[str] = field(default_factory=list)  # per reference: what it gives the target (spec)

    @property
    def failed(self) -> bool:
        return self.score.overall < FAILED_BELOW

    @property
    def lost_reference(self) -> int | None:
        """The picture (1-based) a failed sample lost: its least consistent reference, when that one
        is below :data:`LOST_BELOW`; None for a success or a failure of the instruction alone."""
        worst = int(np.argmin(self.score.ref_scores))
        return worst + 1 if self.failed and self.score.ref_scores[worst] < LOST_BELOW else None

    @property
    def lost_role(self) -> str:
        """'background', 'object', ... (what the lost picture contributes), 'none' or 'unknown'."""
        lost = self.lost_reference
        if lost is None:
            return "none"
        return self.roles[lost - 1] if lost <= len(self.roles) else "unknown"

    def to_json(self) -> dict[str, Any]:
        scores = self.score.to_json()
        # PSNR of a pixel-exact output is inf, which strict JSON cannot carry.
        scores = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in scores.items()}
        lost = {"failed": self.failed, "lost_reference": self.lost_reference}
        return {"index": self.index, "task": self.task, "k": self.k, **scores, **lost}


def summarise(records: Sequence[SampleRecord]) -> dict[str, float]:
    """The aggregate metrics (see the module docstring) and ``n`` over ``records``."""
    if not records:
        return {**dict.fromkeys(HEADLINE, float("nan")), "n": 0}
    return {
        "overall": float(np.mean([r.score.overall for r in records])),
        "ref_consistency": float(np.mean([r.score.ref_consistency for r in records])),
        "worst_ref_consistency": float(np.mean([r.score.worst_ref for r in records])),
        "instruction_accuracy": float(np.mean([r.score.instruction for r in records])),
        "quality": float(np.mean([r.score.quality for r in records])),
        "n": len(records),
    }


@dataclass
class EvalReport:
    ref_consistency: float
    worst_ref_consistency: float
    instruction_accuracy: float
    quality: float
    n: int  # samples evaluated
    by_task: dict[str, dict[str, float]]  # task -> the headline metrics and n
    by_k: dict[int, dict[str, float]]  # K -> the headline metrics and n
    records: list[SampleRecord]
    settings: dict[str, Any] = field(default_factory=dict)  # steps, guidance, seed, budget, mode
    outputs: list[Image.Image] = field(default_factory=list, repr=False)  # one per record (keep_outputs)
    overall: float = float("nan")
    baselines: dict[str, EvalReport] = field(default_factory=dict, repr=False)  # name -> report (--baselines)

    @classmethod
    def from_records(
        cls,
        records: list[SampleRecord],
        settings: dict[str, Any] | None = None,
        outputs: list[Image.Image] | None = None,
    ) -> EvalReport:
        groups_task: dict[str, list[SampleRecord]] = defaultdict(list)
        groups_k: dict[int, list[SampleRecord]] = defaultdict(list)
        for r in records:
            groups_task[r.task or "unknown"].append(r)
            groups_k[r.k].append(r)
        total = summarise(records)
        return cls(
            ref_consistency=total["ref_consistency"],
            worst_ref_consistency=total["worst_ref_consistency"],
            instruction_accuracy=total["instruction_accuracy"],
            quality=total["quality"],
            overall=total["overall"],
            n=len(records),
            by_task={t: summarise(rs) for t, rs in sorted(groups_task.items())},
            by_k={k: summarise(rs) for k, rs in sorted(groups_k.items())},
            records=records,
            settings=dict(settings or {}),
            outputs=list(outputs or []),
        )

    def worst(self, n: int = WORST_CASES) -> list[SampleRecord]:
        """The ``n`` records with the lowest worst-reference score (ties: lowest instruction accuracy)."""
        return sorted(self.records, key=lambda r: (r.score.worst_ref, r.score.instruction))[:n]

    def to_json(self, *, records: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {m: getattr(self, m) for m in HEADLINE}
        out["n"] = self.n
        out["by_task"] = self.by_task
        out["by_k"] = {str(k): v for k, v in self.by_k.items()}  # JSON keys are strings
        out["settings"] = self.settings
        if self.baselines:
            out["baselines"] = {
                name: {m: getattr(b, m) for m in HEADLINE}
                | {"by_k": {str(k): v for k, v in b.by_k.items()}, "by_task": b.by_task}
                for name, b in self.baselines.items()
            }
        if records:
            out["samples"] = [r.to_json() for r in self.records]
        return out

    def to_markdown(self) -> str:
        """Overall, per-task and per-K tables."""

        def table(title: str, rows: dict[Any, dict[str, float]]) -> list[str]:
            lines = [
                f"| {title} | n | overall | ref consistency | worst ref | instruction | quality |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for key, m in rows.items():
                vals = " | ".join(f"{m[k]:.3f}" for k in HEADLINE)
                lines.append(f"| {key} | {m['n']} | {vals} |")
            return lines

        total = {"model": {**{m: getattr(self, m) for m in HEADLINE}, "n": self.n}}
        for name, b in self.baselines.items():
            total[f"baseline: {name}"] = {**{m: getattr(b, m) for m in HEADLINE}, "n": b.n}
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        parts = ["# UniRef evaluation", "", f"Settings: {settings}" if settings else "", ""]
        parts += table("", total) + ["", "## By task", ""] + table("task", self.by_task)
        parts += ["", "## By number of references", ""] + table("K", self.by_k) + [""]
        if self.baselines:
            by_k = {f"{k} · {name}": v for name, b in self.baselines.items() for k, v in b.by_k.items()}
            parts += ["## Baselines by number of references", ""] + table("K · baseline", by_k) + [""]
        return "\n".join(parts + self._lost_section())

    def _lost_section(self) -> list[str]:
        failed = [r for r in self.records if r.failed]
        counts: dict[tuple[int, str], int] = defaultdict(int)
        for r in failed:
            counts[(r.k, r.lost_role)] += 1
        lines = [
            "## Lost references",
            "",
            f"{len(failed)} of {self.n} samples failed (overall < {FAILED_BELOW}); what the least consistent "
            f"reference gave the target when it scored below {LOST_BELOW} ('none': only the instruction failed).",
            "",
            "| K | lost | failed samples |",
            "|---:|---|---:|",
        ]
        return lines + [f"| {k} | {role} | {n} |" for (k, role), n in sorted(counts.items())] + [""]


def _roles(sample: Sample) -> list[str]:
    """Per reference, the first thing it contributes ('background', 'object', 'colour', 'pattern')."""
    refs = (sample.spec or {}).get("refs", [])
    return [(r.get("contributes") or [{"what": "nothing"}])[0]["what"] for r in refs]


def _batches(samples: Iterable[Sample], size: int) -> Iterable[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate(
    pipe: _Pipeline,
    samples: Iterable[Sample],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    noise_level: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    budget: int | str | None = None,
    target_budget: int | str | None = None,
    mode: PlanMode | str = PlanMode.GLOBAL,
    progress: bool = True,
    keep_outputs: bool = False,
    total: int | None = None,
) -> EvalReport:
    """Generate an output for every sample (in batches; mixed K in one batch is fine, the pipeline packs
    them) with the aspect of the sample's target at the model's target budget (or ``target_budget``),
    score it against the sample with the exact metrics (which judge any output size), aggregate.

    Sample ``i`` uses noise seed ``seed + i`` whatever the batch size, so results do not depend on it.
    ``keep_outputs`` keeps the generated images in the report (for the worst-case grid). ``total`` sizes
    the progress bar when ``samples`` is a stream.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1")
    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    records: list[SampleRecord] = []
    outputs: list[Image.Image] = []
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress)
    index = 0
    try:
        for batch in _batches(samples, batch_size):
            scorers = [Scorer(s) for s in batch]  # refuses samples without a spec before any compute
            result = pipe.generate(
                [s.instruction for s in batch],
                [s.refs for s in batch],
                steps=steps,
                guidance=guidance,
                noise_level=noise_level,
                seed=seed + index,
                budget=budget,
                target_budget=target_budget,
                mode=mode,
                progress=False,
                target_like=[sc.size for sc in scorers],
            )
            for s, sc, img in zip(batch, scorers, result.images, strict=True):
                records.append(SampleRecord(index=index, task=s.task, k=s.k, score=sc(img), roles=_roles(s)))
                if keep_outputs:
                    outputs.append(img)
                index += 1
            bar.update(len(batch))
    finally:
        bar.close()
    settings = {
        "steps": steps,
        "guidance": guidance,
        "noise_level": noise_level,
        "seed": seed,
        "budget": budget,
        "target_budget": target_budget,
        "mode": PlanMode(mode).value,
    }
    return EvalReport.from_records(records, settings, outputs)


def trivial_output(
    name: str, refs: Sequence[Image.Image], size: tuple[int, int], other: Image.Image | None
) -> Image.Image | None:
    """The trivial output ``name``: ``copy_first`` (picture 1 returned), ``copy_last``, ``grey`` (uniform
    mid-grey of ``size``) or ``other_target`` (``other``: a right answer to another sample; None where a
    benchmark has none). The one definition behind ``uniref eval --baselines`` and ``uniref bench``."""
    if name == "copy_first":
        return refs[0]
    if name == "copy_last":
        return refs[-1]
    if name == "grey":
        return Image.new("RGB", size, GREY)
    if name == "other_target":
        return other
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")


def baseline_output(name: str, samples: Sequence[Sample], index: int) -> Image.Image:
    """:func:`trivial_output` for sample ``index``; ``other_target`` is the next sample's target (a perfect
    image of the wrong scene)."""
    sample = samples[index]
    other = samples[(index + 1) % len(samples)].target
    out = trivial_output(name, sample.refs, sample.target.size, other)
    assert out is not None
    return out


def evaluate_baselines(samples: Sequence[Sample], names: Sequence[str] = BASELINES) -> dict[str, EvalReport]:
    """Score every trivial output of :func:`baseline_output` on ``samples`` with the same metrics."""
    reports = {}
    scorers = [Scorer(s) for s in samples]
    for name in names:
        records = [
            SampleRecord(index=i, task=s.task, k=s.k, score=sc(baseline_output(name, samples, i)), roles=_roles(s))
            for i, (s, sc) in enumerate(zip(samples, scorers, strict=True))
        ]
        reports[name] = EvalReport.from_records(records, {"baseline": name})
    return reports


def worst_case_grid(report: EvalReport, samples: Sequence[Sample], n: int = WORST_CASES) -> Image.Image:
    """references | output | target | instruction + scores, for the ``n`` worst samples of ``report``
    (``samples`` in evaluation order; the report must have been made with ``keep_outputs=True``)."""
    if len(report.outputs) != len(report.records):
        raise ValueError("the report holds no outputs: evaluate(..., keep_outputs=True)")
    rows = []
    for r in report.worst(n):
        s = samples[r.index]
        refs = ", ".join(f"{v:.2f}" for v in r.score.ref_scores)
        scores = [
            f"worst ref {r.score.worst_ref:.2f}  refs [{refs}]",
            f"instruction {r.score.instruction:.2f}  quality {r.score.quality:.2f}",
        ]
        rows.append(
            SheetRow(
                list(s.refs), [report.outputs[r.index], s.target], f"#{r.index} [{r.task}] {s.instruction}", scores
            )
        )
    if not rows:
        raise ValueError("no evaluated samples to draw")
    return draw_sheet(rows)
