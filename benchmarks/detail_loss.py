"""Where along the noise levels the score is lost (issue 17): the sampler started from the ground truth.

For the first ``--n`` validation compositions (K <= ``--max-refs``), each model's output is scored when
the sampler starts from

* the ground-truth target's latents re-noised to σ₀, for every σ₀ in ``--starts`` (SDEdit-style: the
  default schedule from its first σ <= σ₀, the request's own noise), and
* pure noise (the normal sampler, σ₀ = 1),

beside the codec's round trip of the ground truth (σ₀ = 0: the ceiling a perfect denoiser reaches)
and the trivial baselines.
If the output from a lightly re-noised truth already scores far below the round trip, the denoiser
loses detail that it is handed, not only the layout it must invent at high noise.

    python -m benchmarks.detail_loss runs/probes/objw8/export_step_00000600 --n 24 --starts 0.9,0.7,0.5,0.3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from benchmarks.routing_diagnostics import object_scores
from uniref.budget import Size
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.sample import Sample
from uniref.data.splits import split_samples
from uniref.eval import BASELINES, baseline_output
from uniref.images import atomic_path, resize, to_tensor
from uniref.pipeline import EditPipeline
from uniref.rewards.metrics import score
from uniref.sequence import patchify
from uniref.viz import SheetRow, draw_sheet

PARTS = ("iou", "colour", "placement", "pattern")


def start_from_truth(pipe: EditPipeline, sample: Sample, budget: int, sigma0: float, seed: int = 0) -> Image.Image:
    """The output when the sampler starts from ``sample``'s target re-noised to the schedule's first
    σ <= ``sigma0`` (its own noise); ``sigma0`` 0 is the codec's round trip of the target."""
    like = Size(*sample.target.size)
    prep = pipe.prepare(
        sample.instruction, list(sample.refs), budget=budget, target_budget=budget, target_like=like, seed=seed
    )
    seq = prep.sequences[0]
    rows, cols = seq.grids[0]
    side = pipe.model.spec.token_pixels
    clean = pipe.model.encode_images(
        [to_tensor(resize(sample.target, Size(cols * side, rows * side))).to(pipe.model.device, pipe.model.dtype)]
    )[0]
    if sigma0 <= 0:
        return pipe.decode([clean])[0]
    schedule = prep.schedules[0]
    first = int(torch.nonzero(schedule <= sigma0)[0])
    if first > 0:
        sigma = schedule[first].to(seq.tokens.dtype)
        n = seq.num_target_tokens
        seq.tokens[:n] = (1 - sigma) * patchify(clean, seq.patch) + sigma * seq.tokens[:n]
        prep.schedules[0] = schedule[first:]
    final = pipe.denoise(prep)
    return pipe.decode([seq.target_latent(final[0])])[0]


def score_row(samples: Sequence[Sample], outputs: Sequence[Image.Image]) -> dict[str, float]:
    """Mean ``overall``, worst ref and instruction per sample, and mean placed-object parts and background."""
    scores = [score(output, sample) for sample, output in zip(samples, outputs, strict=True)]
    cells = {
        "overall": [s.overall for s in scores],
        "worst ref": [s.worst_ref for s in scores],
        "instruction": [s.instruction for s in scores],
        **object_scores(samples, outputs),
    }
    return {k: float(np.mean(v)) if v else float("nan") for k, v in cells.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders or registry names")
    parser.add_argument("--n", type=int, default=24, help="validation compositions")
    parser.add_argument("--max-refs", type=int, default=2)
    parser.add_argument("--budget", type=int, default=128, help="reference and output budget side")
    parser.add_argument("--starts", default="0.9,0.7,0.5,0.3", help="σ₀ to start from the re-noised truth")
    parser.add_argument("--grid", help="also draw references | output per start | target for 4 samples here")
    args = parser.parse_args(argv)
    starts = [1.0, *(float(s) for s in args.starts.split(",")), 0.0]
    samples = split_samples("val", args.n, TaskConfig(parse_tasks("compose"), args.max_refs, SizeRange(48, 160)))
    header = ["start", "overall", "worst ref", "instruction", *PARTS, "background"]
    sheet: list[SheetRow] = []
    for model in args.models:
        pipe = EditPipeline.from_pretrained(model)
        print(f"\n{model} @{args.budget}², {len(samples)} val compositions (K <= {args.max_refs})\n")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        by_start = {}
        for sigma0 in starts:
            outputs = [start_from_truth(pipe, s, args.budget, sigma0, seed=i) for i, s in enumerate(samples)]
            by_start[sigma0] = outputs
            label = "pure noise" if sigma0 >= 1 else "codec round trip" if sigma0 <= 0 else f"truth at σ₀ {sigma0:g}"
            row = score_row(samples, outputs)
            print(f"| {label} | " + " | ".join(f"{row[k]:.3f}" for k in header[1:]) + " |", flush=True)
        for name in BASELINES:  # what a trivial output scores on the same samples
            row = score_row(samples, [baseline_output(name, samples, i) for i in range(len(samples))])
            print(f"| *baseline: {name}* | " + " | ".join(f"{row[k]:.3f}" for k in header[1:]) + " |")
        for i, s in enumerate(samples[:4]):
            outs = [by_start[sigma0][i] for sigma0 in starts]
            label = f"{model}: starts sigma0 " + ", ".join(f"{x:g}" for x in starts) + "; target"
            sheet.append(SheetRow(list(s.refs), [*outs, s.target], s.instruction, [label]))
    if args.grid:
        with atomic_path(args.grid) as tmp:
            draw_sheet(sheet).save(tmp, format="PNG")
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
