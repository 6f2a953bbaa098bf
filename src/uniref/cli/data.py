"""``uniref data make | check | show``: generate, validate and look at scene-world datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from uniref.cli import app
from uniref.data.formats import JsonlWriter, LoadReport, iter_samples
from uniref.data.splits import split_seed
from uniref.data.tasks import SizeRange, TaskConfig, generate, parse_tasks
from uniref.errors import DataError
from uniref.images import save_image
from uniref.viz import contact_sheet

data_app = typer.Typer(help="Scene-world datasets: make, check, show.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("make")
def make_command(
    out: Annotated[Path, typer.Option(help="output folder (images/ and manifest.jsonl)")],
    n: Annotated[int, typer.Option(help="number of samples")] = 100,
    tasks: Annotated[str, typer.Option(help="families edit,compose or task names, comma-separated")] = "edit,compose",
    max_refs: Annotated[int, typer.Option(help="largest K for compositions (2..10)")] = 4,
    seed: Annotated[int, typer.Option(help="first seed inside the split's seed range")] = 0,
    split: Annotated[str, typer.Option(help="train, val or test: disjoint seed ranges")] = "train",
    size_range: Annotated[str, typer.Option(help="MIN:MAX side of generated images in pixels")] = "48:160",
) -> None:
    """Generate N scene-world samples with exact ground truth."""
    if n < 1:
        raise DataError(f"--n {n}: need at least one sample")
    try:
        config = TaskConfig(tasks=parse_tasks(tasks), max_refs=max_refs, size_range=SizeRange.parse(size_range))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if not config.usable_tasks:
        raise DataError(f"--max-refs {max_refs} is too small for tasks {tasks}: compositions need K >= 2 (3 for some)")
    seeds = [split_seed(split, seed, i) for i in range(n)]
    writer = JsonlWriter(out)
    for i, s in enumerate(track(seeds, description=f"making {split}", transient=True)):
        writer.add(generate(s, config), key=f"{split}_{i:06d}")
    path = writer.close()
    typer.echo(f"wrote {n} samples to {path}")


def _report_table(report: LoadReport) -> Table:
    table = Table(title=f"{report.ok} good rows of {report.rows}")
    table.add_column("task")
    table.add_column("rows", justify="right")
    for task, count in sorted(report.by_task.items()):
        table.add_row(task, str(count))
    for k, count in sorted(report.by_k.items()):
        table.add_row(f"K={k}", str(count))
    return table


@data_app.command("check")
def check_command(source: Annotated[Path, typer.Argument(help="dataset folder, manifest or shards")]) -> None:
    """Read every row; print counts per task and K and every bad row. Exit code 1 if any row is bad."""
    report = LoadReport()
    for _ in iter_samples(source, report):
        pass
    console = Console()
    console.print(_report_table(report))
    for problem in report.problems:
        typer.echo(f"bad {problem}")
    if report.problems:
        typer.echo(f"{len(report.problems)} bad rows of {report.rows}", err=True)
        raise typer.Exit(1)


@data_app.command("show")
def show_command(
    source: Annotated[Path, typer.Argument(help="dataset folder, manifest or shards")],
    output: Annotated[Path, typer.Option("-o", "--output", help="contact sheet PNG")] = Path("sheet.png"),
    rows: Annotated[int, typer.Option(help="number of samples shown")] = 8,
) -> None:
    """Write a contact sheet: references | target | instruction, one sample per row."""
    samples = []
    for sample in iter_samples(source):
        samples.append(sample)
        if len(samples) >= rows:
            break
    if not samples:
        raise DataError(f"{source}: no readable samples to show")
    save_image(contact_sheet(samples), output)
    typer.echo(f"wrote {output}")
