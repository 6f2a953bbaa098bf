"""``uniref eval``: run a model on a scene-world dataset and score it with the exact metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uniref.budget import PlanMode
from uniref.cli import app, warnings_to_stderr
from uniref.data.formats import LoadReport, iter_samples
from uniref.errors import BudgetError, DataError
from uniref.images import atomic_path, save_image

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
WORST_PNG = "worst.png"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option(help="dataset folder, manifest, shards or parquet")],
    out: Annotated[Path, typer.Option(help="report folder (report.md, report.json, worst.png)")],
    model: Annotated[str, typer.Option(help="tiny (embedded default), tiny-random, or a model folder")] = "tiny",
    n: Annotated[int | None, typer.Option(min=1, help="evaluate only the first N good rows")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="denoising steps; default: the model's")] = None,
    guidance: Annotated[float | None, typer.Option(help="true-CFG scale (1 = off); default: the model's")] = None,
    noise_level: Annotated[
        float | None,
        typer.Option("--noise-level", min=0.0, help="SDE sampler noise level (0 = Euler ODE); default: the model's"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="samples per pipeline call (mixed K is packed)")] = 8,
    seed: Annotated[int, typer.Option(help="noise seed of the first sample (sample i uses seed + i)")] = 0,
    budget: Annotated[str | None, typer.Option(help="reference pixel budget, 1024 = 1024²; default: native")] = None,
    mode: Annotated[PlanMode, typer.Option(help="global (SELF) or per_image (diffusers)")] = PlanMode.GLOBAL,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    baselines: Annotated[
        bool, typer.Option(help="also score the trivial outputs copy_first, copy_last, grey, other_target")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (the summary)")] = False,
) -> None:
    """Generate every row's output, score it per reference, write per-task and per-K tables and a worst-case grid."""
    from uniref.eval import evaluate, evaluate_baselines, worst_case_grid
    from uniref.pipeline import EditPipeline

    if mode is PlanMode.GLOBAL_ROUND:
        raise BudgetError("--mode global_round only plans; evaluate with global or per_image")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder for the report")
    load = LoadReport()
    samples = []
    for sample in iter_samples(data, load):
        if not sample.spec or "target" not in sample.spec:
            raise DataError(
                f"{data}: row {load.rows} has no scene-world spec; exact metrics need one (uniref data make)"
            )
        samples.append(sample)
        if n is not None and len(samples) >= n:
            break
    # Bad rows are reported, never silently dropped (on stderr, so --json stays one object on stdout).
    for problem in load.problems:
        typer.echo(f"bad {problem}", err=True)
    if load.problems:
        typer.echo(f"{len(load.problems)} bad rows of {load.rows} skipped", err=True)
    if not samples:
        raise DataError(f"{data}: no readable samples to evaluate")

    with warnings_to_stderr():
        pipe = EditPipeline.from_pretrained(model)
        report = evaluate(
            pipe,
            samples,
            steps=steps,
            guidance=guidance,
            noise_level=noise_level,
            batch_size=batch_size,
            seed=seed,
            budget=budget,
            mode=mode,
            progress=progress,
            keep_outputs=True,
        )
    report.settings["model"] = model
    if baselines:
        report.baselines = evaluate_baselines(samples)
    summary = report.to_json(records=False)
    summary["rows"] = {"read": load.rows, "bad": len(load.problems), "evaluated": report.n}
    summary["problems"] = [str(p) for p in load.problems]

    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / REPORT_JSON, json.dumps({**summary, "samples": [r.to_json() for r in report.records]}, indent=1))
    _write_text(out / REPORT_MD, report.to_markdown())
    save_image(worst_case_grid(report, samples), out / WORST_PNG)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(report.to_markdown())
        typer.echo(f"wrote {out / REPORT_MD}, {out / REPORT_JSON}, {out / WORST_PNG}")
