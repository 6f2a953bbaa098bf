"""``uniref data make | check | show``: generate, validate and look at scene-world datasets."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import track
from rich.table import Table

from uniref.cli import app
from uniref.data.formats import JsonlWriter, LoadReport, iter_samples
from uniref.data.tasks import SizeRange, TaskConfig, generate, parse_tasks
from uniref.errors import DataError
from uniref.images import save_image

data_app = typer.Typer(help="Scene-world datasets: make, check, show.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Splits draw sample seeds from disjoint ranges, so a test sample can never be generated for training.
SPLIT_SPAN = 1 << 40
SPLITS = {"train": 0, "val": 1, "test": 2}
SHEET_THUMB = 96  # contact-sheet thumbnail height in pixels
SHEET_TEXT_WIDTH = 360  # pixels of the instruction column
SHEET_PAD = 6
SHEET_CHARS = 52  # characters per line of wrapped instruction text
SHEET_FONT_SIZE = 12


def split_seed(split: str, seed: int, index: int) -> int:
    """The seed of sample ``index`` of ``split`` when the user asks for ``--seed seed``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    if not 0 <= seed + index < SPLIT_SPAN:
        raise DataError(f"--seed {seed} with {index + 1} samples leaves the split's seed range [0, 2^40)")
    return SPLITS[split] * SPLIT_SPAN + seed + index


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


def contact_sheet(samples: list) -> Image.Image:
    """One row per sample: thumbnails of the references, a gap, the target, then the wrapped instruction."""

    def thumb(img: Image.Image) -> Image.Image:
        w = max(1, round(img.width * SHEET_THUMB / img.height))
        return img.resize((w, SHEET_THUMB), Image.Resampling.LANCZOS)

    rows = [([thumb(r) for r in s.refs], thumb(s.target), s.instruction, s.task) for s in samples]
    img_width = max(sum(t.width + SHEET_PAD for t in refs) + SHEET_PAD * 3 + tgt.width for refs, tgt, _, _ in rows)
    width = img_width + SHEET_TEXT_WIDTH + SHEET_PAD
    height = len(rows) * (SHEET_THUMB + SHEET_PAD) + SHEET_PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=SHEET_FONT_SIZE)
    y = SHEET_PAD
    for refs, tgt, text, task in rows:
        x = SHEET_PAD
        for r in refs:
            sheet.paste(r, (x, y))
            x += r.width + SHEET_PAD
        x += SHEET_PAD * 2
        draw.line([(x - SHEET_PAD * 2, y), (x - SHEET_PAD * 2, y + SHEET_THUMB)], fill=(0, 0, 0), width=2)
        sheet.paste(tgt, (x, y))
        label = f"[{task}] " + text if task else text
        draw.multiline_text(
            (img_width + SHEET_PAD, y), "\n".join(textwrap.wrap(label, SHEET_CHARS)), fill=(0, 0, 0), font=font
        )
        y += SHEET_THUMB + SHEET_PAD
    return sheet
