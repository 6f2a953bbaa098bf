"""``uniref edit``: an instruction and K reference images in, one edited image out."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

from uniref.budget import PlanMode, Size
from uniref.cli import app, warnings_to_stderr
from uniref.cli.plan import plan_json
from uniref.errors import BudgetError, ImageInputError, UniRefError
from uniref.images import image_size, load_images, save_image

# --dtype names (uniref.models.base.resolve_dtype): "auto" is the one default of every entry point.
DTYPES = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def device_kwargs(device: str) -> dict[str, str]:
    """``--device``: ``auto`` (the default) leaves the choice to the loader (the Qwen flavours go to CUDA when
    there is one, the tiny ones stay on the CPU); anything else is passed on. Checked before any loading."""
    if not _DEVICE.fullmatch(device):
        raise UniRefError(f"--device {device!r}: choose auto, cpu, cuda, cuda:N or mps")
    return {} if device == "auto" else {"device": device}


def parse_size(text: str) -> Size:
    """``WxH`` -> Size; anything else is a one-line error."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) <= 0 or int(match[2]) <= 0:
        raise BudgetError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x384")
    return Size(int(match[1]), int(match[2]))


def check_output_path(path: Path) -> None:
    if path.is_dir():
        raise ImageInputError(f"-o {path}: is a directory; give a file name such as out.png")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ImageInputError(f"-o {path}: unknown image format {path.suffix!r}; use .png, .jpg or .webp")


@app.command("edit")
def edit_command(
    instruction: Annotated[str, typer.Argument(help="what to do, e.g. 'put the red circle on picture 1'")],
    ref: Annotated[list[Path], typer.Option("--ref", help="a reference image; repeat for K references")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the edited image")],
    model: Annotated[str, typer.Option(help="tiny (embedded default), tiny-random, or a model folder")] = "tiny",
    size: Annotated[str | None, typer.Option(help="output size WxH; default: from the last reference")] = None,
    size_like: Annotated[
        int | None,
        typer.Option("--size-like", help="output takes reference N's aspect (1-based) under the output budget"),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="denoising steps; default: the model's")] = None,
    guidance: Annotated[float | None, typer.Option(help="true-CFG scale (1 = off); default: the model's")] = None,
    noise_level: Annotated[
        float | None,
        typer.Option("--noise-level", min=0.0, help="SDE sampler noise level (0 = Euler ODE); default: the model's"),
    ] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    budget: Annotated[str | None, typer.Option(help="reference pixel budget, 1024 = 1024²; default: native")] = None,
    mode: Annotated[PlanMode, typer.Option(help="global (SELF) or per_image (diffusers)")] = PlanMode.GLOBAL,
    device: Annotated[str, typer.Option(help="auto (CUDA when there is one), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on a CUDA GPU that has it, else fp32), fp32, bf16 or fp16")
    ] = "auto",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    explain: Annotated[
        Path | None,
        typer.Option(help="write per-reference attention (heat maps, attention.json, summary) into this folder"),
    ] = None,
) -> None:
    """Edit or compose: the instruction refers to the references as picture 1..K in --ref order."""
    from uniref.pipeline import EditPipeline

    if dtype not in DTYPES:
        raise UniRefError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    placement = device_kwargs(device)
    if mode is PlanMode.GLOBAL_ROUND:
        raise BudgetError("--mode global_round only plans; edit with global or per_image")
    target = parse_size(size) if size else None
    if size_like is not None and (size is not None or not 1 <= size_like <= len(ref)):
        problem = "give --size or --size-like, not both" if size else f"there are {len(ref)} references (1..{len(ref)})"
        raise BudgetError(f"--size-like {size_like}: {problem}")
    check_output_path(output)
    refs = load_images(ref)
    like = image_size(refs[size_like - 1]) if size_like is not None else None
    total_start = time.perf_counter()
    with warnings_to_stderr():
        pipe = EditPipeline.from_pretrained(model, dtype=dtype, **placement)
        recorder = getattr(pipe.model, "record_attention", None)
        if explain is not None and recorder is None:
            raise UniRefError(f"--explain: model {model} does not expose its attention (the tiny flavour does)")
        with recorder() if explain is not None else contextlib.nullcontext() as attention:
            result = pipe.generate(
                instruction,
                refs,
                target,
                steps=steps,
                guidance=guidance,
                noise_level=noise_level,
                seed=seed,
                budget=budget,
                mode=mode,
                progress=progress,
                target_like=like,
            )
    image = result.images[0]
    save_image(image, output)
    explained = None
    if explain is not None:
        from uniref.explain import write_explanation

        explained = write_explanation(explain, image, attention.mean(0), attention.grids[0])
        if not as_json:
            typer.echo(explained)
    if as_json:
        seconds = result.timings.as_dict()
        seconds["total"] = time.perf_counter() - total_start
        plan = plan_json(result.ref_plans[0], ref, pipe.model.spec.token_pixels)
        typer.echo(
            json.dumps(
                {"output": str(output), "width": image.width, "height": image.height, "plan": plan, "seconds": seconds}
                | ({"explain": {"folder": str(explain), "summary": explained}} if explain is not None else {})
            )
        )
    else:
        typer.echo(f"wrote {output} ({image.width}x{image.height}) in {time.perf_counter() - total_start:.1f}s")
