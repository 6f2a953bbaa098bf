"""Measure a trained tiny model for its model card: held-out test metrics by task and by K (against
the untrained ``tiny-random``), the loss curve and a sample grid, from the training run's own logs.

    python -m benchmarks.model_card --run runs/tiny_sft --model src/uniref/assets/tiny --n 48

writes ``docs/models/tiny_eval.md`` (tables), ``docs/models/tiny_loss.png`` and
``docs/models/tiny_samples.png``; ``docs/models/tiny.md`` quotes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks._report import save_figure
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import EvalReport, evaluate
from uniref.images import save_image
from uniref.pipeline import EditPipeline
from uniref.viz import SheetRow, draw_sheet

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


def table(title: str, trained: dict, baseline: dict) -> list[str]:
    lines = [
        f"| {title} | n | ref consistency | worst ref | instruction | quality | ref consistency, tiny-random |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, m in trained.items():
        base = baseline.get(key, {}).get("ref_consistency", float("nan"))
        lines.append(
            f"| {key} | {m['n']} | {m['ref_consistency']:.3f} | {m['worst_ref_consistency']:.3f} | "
            f"{m['instruction_accuracy']:.3f} | {m['quality']:.3f} | {base:.3f} |"
        )
    return lines


def _overall(report: EvalReport) -> dict[str, dict]:
    return {"all": {**report.to_json(records=False), "n": report.n}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--max-refs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    config = TaskConfig(tasks=parse_tasks("edit,compose"), max_refs=args.max_refs, size_range=SizeRange(48, 160))
    samples = split_samples("test", args.n, config)
    reports: dict[str, EvalReport] = {}
    seconds: dict[str, float] = {}
    for name in (args.model, "tiny-random"):
        pipe = EditPipeline.from_pretrained(name)
        start = time.perf_counter()
        reports[name] = evaluate(pipe, samples, steps=args.steps, keep_outputs=name == args.model)
        seconds[name] = time.perf_counter() - start
    trained, baseline = reports[args.model], reports["tiny-random"]
    facts = loss_curve(args.run / "metrics.jsonl", DOCS / "tiny_loss.png")
    rows = [
        SheetRow(list(s.refs), [out, s.target], f"[{s.task}] {s.instruction}")
        for s, out in zip(samples[:GRID_ROWS], trained.outputs[:GRID_ROWS], strict=True)
    ]
    save_image(draw_sheet(rows), DOCS / "tiny_samples.png")

    text = [
        f"Command: `python -m benchmarks.model_card --run {args.run} --model {args.model} --n {args.n}`",
        "",
        f"Held-out **test** split (seeds disjoint from training), {args.n} samples, tasks edit+compose, "
        f"K ≤ {args.max_refs}; sampler steps: {args.steps or 'model default'}; evaluation took "
        f"{seconds[args.model]:.0f} s.",
        f"Training run: {facts['steps']} steps, {facts['hours']:.2f} h of training wall time on 2 CPU cores, "
        f"last budget {facts['budget']}², last loss {facts['last_loss']:.4f}.",
        "",
        *table("", _overall(trained), _overall(baseline)),
        "",
        "### By task",
        "",
        *table("task", trained.by_task, baseline.by_task),
        "",
        "### By number of references",
        "",
        *table("K", trained.by_k, baseline.by_k),
        "",
    ]
    (DOCS / "tiny_eval.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
