"""Measure a trained tiny model for its model card: held-out test metrics by task and by K (against
other models and the trivial baselines), the loss curve and a sample grid, from the training run's own logs.

    python -m benchmarks.model_card --run runs/tiny_sft --model src/uniref/assets/tiny --n 64

writes ``docs/models/tiny_eval.md`` (tables), ``docs/models/tiny_loss.png`` and
``docs/models/tiny_samples.png``; ``docs/models/tiny.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._report import markdown_table, save_figure
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import HEADLINE, EvalReport, SampleRecord, evaluate, evaluate_baselines, summarise
from uniref.images import save_image
from uniref.pipeline import EditPipeline
from uniref.viz import SheetRow, draw_sheet

SPLIT_WORDS = {
    "test": "Held-out **test** split (seeds disjoint from training and validation)",
    "val": "**Validation** split (for choosing; the card's figures are on test)",
}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "models"
GRID_ROWS = 8


def loss_curve(metrics: Path, out: Path) -> dict[str, float]:
    """Plot loss (and validation worst-reference, if logged) against step; returns run facts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="training loss (x0 MSE)")
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")
    changes = {r["step"] for r, prev in zip(train[1:], train, strict=False) if r["stage"] != prev["stage"]}
    for boundary in sorted(changes):
        ax.axvline(boundary, color="grey", ls=":", lw=0.8)
    ax.legend(loc="upper right")
    ax.set_title("tiny SFT: loss by step (dotted: budget stage changes)")
    save_figure(fig, out)
    # Wall time: sum of gaps between logged steps, leaving out pauses (resumes) longer than 10 minutes.
    gaps = [b["time"] - a["time"] for a, b in zip(train, train[1:], strict=False)]
    return {
        "steps": train[-1]["step"],
        "hours": sum(g for g in gaps if g < 600) / 3600,
        "last_loss": train[-1]["loss"],
        "budget": train[-1]["budget"],
    }


GOALS = {"edits (K = 1)": 0.7, "compositions K = 2–4": 0.6, "compositions K = 5–6": 0.4}  # issue 17
GOAL_MARGIN = 0.3  # ... and each at least this far above the best trivial baseline


def _bucket(record: SampleRecord) -> str:
    return "edits (K = 1)" if record.k == 1 else "compositions K = 2–4" if record.k <= 4 else "compositions K = 5–6"


def _rows(reports: dict[str, EvalReport], group: Callable[[SampleRecord], Any]) -> dict[Any, dict[str, dict]]:
    """group key -> contestant -> summary, the contestants in ``reports`` order."""
    keys = sorted({group(r) for rep in reports.values() for r in rep.records}, key=str)
    return {
        key: {name: summarise([r for r in rep.records if group(r) == key]) for name, rep in reports.items()}
        for key in keys
    }


def table(title: str, rows: dict[Any, dict[str, dict]]) -> list[str]:
    header = [title, "contestant", "n", *("overall", "ref consistency", "worst ref", "instruction", "quality")]
    body = [
        [key, name if not name.startswith("baseline") else f"*{name}*", m["n"], *(f"{m[h]:.3f}" for h in HEADLINE)]
        for key, by_name in rows.items()
        for name, m in by_name.items()
    ]
    return markdown_table(header, body).splitlines()


def goal_table(reports: dict[str, EvalReport], model: str, split: str = "test") -> list[str]:
    rows = _rows(reports, _bucket)
    body = []
    for bucket, goal in GOALS.items():
        by_name = rows.get(bucket, {})
        if model not in by_name:
            continue
        best_name, best = max(
            ((n, m["overall"]) for n, m in by_name.items() if n.startswith("baseline")), key=lambda t: t[1]
        )
        got = by_name[model]["overall"]
        met = got >= goal and got - best >= GOAL_MARGIN
        body.append(
            [
                bucket,
                by_name[model]["n"],
                f"{got:.3f}",
                goal,
                f"{best:.3f} ({best_name[10:]})",
                f"{got - best:+.3f}",
                "yes" if met else "**no**",
            ]
        )
    header = [f"{split} samples", "n", "overall", "goal", "best trivial baseline", "margin (goal +0.3)", "met"]
    return markdown_table(header, body).splitlines()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--compare", nargs="*", default=["tiny-random"], help="other models on the same samples")
    parser.add_argument("--n", type=int, default=64, help="test single edits, and as many compositions")
    parser.add_argument("--max-refs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--split", choices=["val", "test"], default="test", help="val to choose between models, test for the card"
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for tiny_eval.md and its figures")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    size_range = SizeRange(48, 160)
    samples = [
        *split_samples(args.split, args.n, TaskConfig(tasks=parse_tasks("edit"), size_range=size_range)),
        *split_samples(
            args.split, args.n, TaskConfig(tasks=parse_tasks("compose"), max_refs=args.max_refs, size_range=size_range)
        ),
    ]
    reports: dict[str, EvalReport] = {}
    seconds: dict[str, float] = {}
    for name in (args.model, *args.compare):
        pipe = EditPipeline.from_pretrained(name)
        start = time.perf_counter()
        reports[name] = evaluate(pipe, samples, steps=args.steps, keep_outputs=name == args.model)
        seconds[name] = time.perf_counter() - start
    reports |= {f"baseline: {name}": rep for name, rep in evaluate_baselines(samples).items()}
    trained = reports[args.model]
    facts = loss_curve(args.run / "metrics.jsonl", out / "tiny_loss.png")
    picked = [i for i in range(len(samples)) if i % max(1, len(samples) // GRID_ROWS) == 0][:GRID_ROWS]
    rows = [
        SheetRow(
            list(samples[i].refs),
            [trained.outputs[i], samples[i].target],
            f"[{samples[i].task}] {samples[i].instruction}",
        )
        for i in picked
    ]
    save_image(draw_sheet(rows), out / "tiny_samples.png")

    command = f"python -m benchmarks.model_card --run {args.run} --model {args.model} --n {args.n}"
    if args.compare != ["tiny-random"]:
        command += " --compare " + " ".join(args.compare)
    if args.split != "test":
        command += f" --split {args.split} --out {out}"
    text = [
        f"Command: `{command}`",
        "",
        f"{SPLIT_WORDS[args.split]}: the first {args.n} single "
        f"edits and the first {args.n} compositions (compose, transfer, conflict; K = 2–{args.max_refs}); "
        f"sampler steps: {args.steps or 'model default'}; evaluating `{args.model}` took "
        f"{seconds[args.model]:.0f} s. `overall` = √(instruction · worst ref) per sample, then the mean "
        "(ground truth scores 1). Rows in *italics* are the trivial baselines.",
        f"Training run: {facts['steps']} steps, {facts['hours']:.2f} h of training wall time on 2 CPU cores, "
        f"last budget {facts['budget']}², last loss {facts['last_loss']:.4f}.",
        "",
        "### Goals (issue 17)",
        "",
        *goal_table(reports, args.model, args.split),
        "",
        "### By group",
        "",
        *table("group", _rows(reports, _bucket)),
        "",
        "### By number of references",
        "",
        *table("K", _rows(reports, lambda r: r.k)),
        "",
        "### By task",
        "",
        *table("task", _rows(reports, lambda r: r.task)),
        "",
    ]
    (out / "tiny_eval.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
