"""``uniref plan``: show how K references are sized under a pixel budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from uniref.budget import QWEN_MULTIPLE, QWEN_TOKEN_PIXELS, Plan, PlanMode, parse_budget, plan
from uniref.cli import app
from uniref.images import image_size, load_images


def plan_json(result: Plan, paths: list[Path], token_pixels: int) -> dict[str, Any]:
    """The JSON object of ``uniref plan --json`` (also embedded in ``uniref edit --json``)."""
    tokens = result.tokens(token_pixels)
    return {
        "mode": result.mode.value,
        "budget_pixels": result.budget_pixels,
        "multiple": result.multiple,
        "images": [
            {
                "path": str(p),
                "width": o.width,
                "height": o.height,
                "planned_width": s.width,
                "planned_height": s.height,
                "tokens": t,
            }
            for p, o, s, t in zip(paths, result.originals, result.sizes, tokens, strict=True)
        ],
        "total_tokens": sum(tokens),
        "token_cap": result.budget_pixels // (token_pixels * token_pixels),
    }


@app.command("plan")
def plan_command(
    images: Annotated[list[Path], typer.Argument(help="reference images", show_default=False)],
    budget: Annotated[str, typer.Option(help="pixel budget: 1024 means 1024x1024; WxH also accepted")] = "1024",
    mode: Annotated[PlanMode, typer.Option(help="global (SELF), per_image (diffusers), global_round (UniPic-3)")] = (
        PlanMode.GLOBAL
    ),
    multiple: Annotated[int, typer.Option(help="every side is a multiple of this many pixels")] = QWEN_MULTIPLE,
    token_pixels: Annotated[
        int, typer.Option(help="pixels per DiT token side (16 for Qwen-Image: VAE x8, 2x2 patches)")
    ] = QWEN_TOKEN_PIXELS,
    max_upscale: Annotated[
        float | None, typer.Option(help="global mode: never enlarge an image more than this factor")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Plan the sizes of K reference images under one budget and show tokens and budget use."""
    loaded = load_images(images)
    result = plan([image_size(im) for im in loaded], parse_budget(budget), multiple, mode, max_upscale=max_upscale)
    data = plan_json(result, images, token_pixels)
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=f"{mode.value} plan, budget {budget} ({result.budget_pixels:,} px), multiple {multiple}")
    for col in ("image", "original", "planned", "tokens", "aspect error"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for item, err in zip(data["images"], result.aspect_errors(), strict=True):
        table.add_row(
            item["path"],
            f"{item['width']}x{item['height']}",
            f"{item['planned_width']}x{item['planned_height']}",
            str(item["tokens"]),
            f"{err:.1%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"total tokens {data['total_tokens']:,} of {data['token_cap']:,} (budget use {result.budget_use:.1%})"
    )
