"""What the model believes along the sampling path (issue 17): its x̂0 decoded at several steps.

For the first ``--n`` validation compositions (K <= ``--max-refs``), one sheet row per sample:
references | x̂0 at the chosen steps of the default sampler | the output | the target. If the
output is already in the first x̂0 (at σ = 1, from pure noise), the sampler is not where detail is
lost: the model's one-shot guess is.

    python -m benchmarks.x0_trace runs/probes/cfg_control/export_step_00000600 --out docs/ablations/x0_trace.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from uniref.budget import Size
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.images import atomic_path
from uniref.pipeline import EditPipeline
from uniref.sequence import unpatchify
from uniref.viz import SheetRow, draw_sheet


def trace(pipe: EditPipeline, instruction: str, refs: list, like: Size, budget: int, at: Sequence[int]) -> tuple:
    """(x̂0 images at steps ``at``, their σ, the output image) of the default sampler, seed 0."""
    guesses, sigmas = [], []

    def keep_x0(i: int, sigma: torch.Tensor, xs: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        if i in at:
            guesses.append(xs[0] - sigma[0].float() * v[0])
            sigmas.append(float(sigma[0]))

    result = pipe.generate(
        instruction, refs, budget=budget, target_budget=budget, target_like=like, progress=False, on_step=keep_x0
    )
    _, h, w = result.latents[0].shape  # tokens back to a latent of the output's grid
    patch = pipe.model.spec.patch_size
    images = pipe.decode([unpatchify(g, h // patch, w // patch, patch) for g in guesses])
    return images, sigmas, result.images[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model folder or registry name")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--n", type=int, default=4, help="validation compositions")
    parser.add_argument("--max-refs", type=int, default=2)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--at", default="0,5,10,15,19", help="sampler steps whose x̂0 to show")
    args = parser.parse_args(argv)
    at = [int(s) for s in args.at.split(",")]
    pipe = EditPipeline.from_pretrained(args.model)
    samples = split_samples("val", args.n, TaskConfig(parse_tasks("compose"), args.max_refs, SizeRange(48, 160)))
    rows = []
    for s in samples:
        guesses, sigmas, output = trace(pipe, s.instruction, list(s.refs), Size(*s.target.size), args.budget, at)
        # The sheet's font has no σ or x̂: spell them.
        labels = f"x0 guesses at sigma {', '.join(f'{sg:.2f}' for sg in sigmas)}; output; target"
        rows.append(SheetRow(list(s.refs), [*guesses, output, s.target], s.instruction, [labels]))
    with atomic_path(args.out) as tmp:
        draw_sheet(rows).save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
