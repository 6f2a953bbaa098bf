"""Why compositions fail, per model (issue 17 §2–3): where placed objects look, and what of them survives.

For each model folder, on the first ``--n`` validation compositions (``compose``, K <= ``--max-refs``) and
``--n``/2 single edits (``--edits``: the edit family or some of its tasks):

* **routing share**: of the attention a placed object's tokens give to reference tokens, the share on
  its source object (``uniref.train.routing``; exp of minus the routing loss, so a geometric mean),
  beside the share a uniform reader of every reference token would give; the same for background
  tokens and the background picture (**background routing share**);
* **object scores** of the compositions' placed objects (``uniref.rewards``): IoU, colour, placement and
  pattern, each as a mean and as the fraction >= 0.5, and the background score;
* ``overall`` (√(instruction · worst ref)) by family.

    python -m benchmarks.routing_diagnostics runs/probes/base_tiny runs/probes/ft_route/export_step_00000900
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.ablations import eval_model, sample_grid
from uniref.budget import plan, plan_target
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.sample import Sample
from uniref.data.splits import split_samples
from uniref.images import image_size
from uniref.models.tiny import load_tiny_folder
from uniref.rewards.metrics import Scorer
from uniref.train.batch import flow_loss, make_batch
from uniref.train.routing import pack_routes


def _model_batch(folder: str | Path, samples: Sequence[Sample], budget: int) -> tuple:
    """(model, its training batch of ``samples`` at noise seeds 0.., its conditioning)."""
    model = load_tiny_folder(folder)
    batch = make_batch(model, samples, budget**2, budget**2, list(range(len(samples))))
    return model, batch, model.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)


def routing_share(
    folder: str | Path, samples: Sequence[Sample], budget: int, background: bool = False
) -> tuple[float, float]:
    """(model's share, uniform share) over the placed objects of ``samples`` at noise seed 0; with
    ``background``, over their background tokens (the share given to the background picture)."""
    model, batch, cond = _model_batch(folder, samples, budget)
    routes = [[r for r in rs if r.background == background] for rs in batch.routes]
    with torch.no_grad():
        parts = flow_loss(
            model, dataclasses.replace(batch, routes=routes), cond, "x0", routing=1.0, route_background=background
        )
    tokens = batch.packed.tokens.values
    grids = [s.grids for s in batch.packed.sequences]
    packed = pack_routes(routes, batch.packed.tokens.spans, grids, 0, tokens.shape[1], tokens.shape[0])
    assert packed is not None and parts.routing is not None
    uniform = (packed.good.sum(-1).float() / packed.refs.sum(-1).float())[packed.valid].mean()
    return float(torch.exp(-parts.routing)), float(uniform)


def x0_error_split(
    folder: str | Path, samples: Sequence[Sample], budget: int, sigmas: Sequence[float]
) -> list[tuple[float, float, float, float]]:
    """Per noise level in ``sigmas`` (every sample's target re-noised to it), the model's x̂0 error as
    the fraction of what predicting the latent mean (0: the codec's latents are normalised) would
    miss, for object and for background tokens; then the objects' share of target tokens and of the
    error. Where the loss sits, against where the score is lost."""
    model, batch, cond = _model_batch(folder, samples, budget)
    values, spans = batch.packed.tokens.values, batch.packed.tokens.spans
    targets = [(row, start, start + v.shape[0]) for (row, start, _), v in zip(spans, batch.target_v, strict=True)]
    # x_t = x_0 + σ (ε − x_0), and target_v is ε − x_0.
    clean = [values[r, a:e] - float(batch.sigma[i]) * batch.target_v[i] for i, (r, a, e) in enumerate(targets)]
    masks = [m for m in batch.object_masks if m is not None]
    assert len(masks) == len(targets)
    spreads = [x_0.pow(2).mean(-1) for x_0 in clean]
    obj_mean = sum(float(s[m].sum()) for s, m in zip(spreads, masks, strict=True))
    bg_mean = sum(float(s[~m].sum()) for s, m in zip(spreads, masks, strict=True))
    tokens = float(torch.cat(masks).float().mean())
    rows = []
    for sigma in sigmas:
        for (r, a, e), x_0, v in zip(targets, clean, batch.target_v, strict=True):
            values[r, a:e] = x_0 + sigma * v
        with torch.no_grad():
            x0_hat = model.predict_x0(batch.packed, cond, torch.full((len(samples),), sigma))
        errors = [(x0_hat[r, a:e] - x_0).pow(2).mean(-1) for (r, a, e), x_0 in zip(targets, clean, strict=True)]
        obj = sum(float(err[m].sum()) for err, m in zip(errors, masks, strict=True))
        bg = sum(float(err[~m].sum()) for err, m in zip(errors, masks, strict=True))
        rows.append((obj / obj_mean, bg / bg_mean, tokens, obj / (obj + bg)))
    return rows


def object_scores(samples: Sequence[Sample], outputs: Sequence, last_only: bool = False) -> dict[str, list[float]]:
    """Every placed object's score parts (``last_only``: the last object of each target, the one an
    `add` adds), and each sample's background score."""
    parts: dict[str, list[float]] = {"iou": [], "colour": [], "placement": [], "pattern": [], "background": []}
    for sample, output in zip(samples, outputs, strict=True):
        objects, background = Scorer(sample).parts(output)
        for score in objects[-1:] if last_only else objects:
            for key in ("iou", "colour", "placement", "pattern"):
                parts[key].append(getattr(score, key))
        parts["background"].append(background)
    return parts


def placed_object_facts(sample: Sample, budget: int) -> list[tuple[bool, float]]:
    """Per placed object of a composition: does the instruction name its colour, and its diameter in
    its (planned) reference over its diameter in the (planned) output (1: a copy at the same scale)."""
    refs = plan([image_size(r) for r in sample.refs], budget**2, 8).sizes
    out = plan_target(budget**2, 8, like=image_size(sample.target))
    words = sample.instruction.split()
    facts = []
    for j, obj in enumerate(sample.spec["target"]["scene"]["objects"]):
        i = next(i for i, r in enumerate(sample.spec["refs"]) if {"what": "object", "object": j} in r["contributes"])
        # Distractors never share the shown object's shape; a transfer may have changed its colour.
        shown = next(o for o in sample.spec["refs"][i]["scene"]["objects"] if o["shape"] == obj["shape"])
        ratio = shown["size"] * min(refs[i].width, refs[i].height) / (obj["size"] * min(out.width, out.height))
        facts.append((obj["colour"] in words, ratio))
    return facts


def _split(label: str, groups: dict[str, list[int]], parts: dict[str, list[float]]) -> str:
    cells = [
        f"{name} (n={len(idx)}): colour {np.mean([parts['colour'][i] for i in idx]):.3f}, "
        f"IoU {np.mean([parts['iou'][i] for i in idx]):.3f}"
        for name, idx in groups.items()
        if idx
    ]
    return f"  {label}: " + "; ".join(cells)


def _facts_split(compositions: Sequence[Sample], parts: dict[str, list[float]], budget: int) -> str:
    """Two lines: placed objects' colour and IoU by whether the words name their colour, and by the
    scale of the copy (``placed_object_facts``)."""
    named: dict[str, list[int]] = {"named": [], "not named": []}
    scale: dict[str, list[int]] = {"<0.8": [], "0.8-1.25": [], ">=1.25": []}
    facts = [f for sample in compositions for f in placed_object_facts(sample, budget)]
    for n, (is_named, ratio) in enumerate(facts):
        named["named" if is_named else "not named"].append(n)
        scale["<0.8" if ratio < 0.8 else "0.8-1.25" if ratio < 1.25 else ">=1.25"].append(n)
    return _split("colour in the words", named, parts) + "\n" + _split("reference/output diameter", scale, parts)


def _aspect_split(
    samples: Sequence[Sample], parts: dict[str, list[float]], last_only: bool = False, label: str = "output aspect"
) -> str:
    """One line: objects' colour and IoU by the output's aspect (long side / short side). An object's
    size is a fraction of the short side, so on a long canvas it spans a smaller share of one axis's
    normalised coordinates than of the other's: the shape is harder to draw from those coordinates."""
    groups: dict[str, list[int]] = {"<1.25": [], "1.25-1.6": [], ">=1.6": []}
    n = 0
    for sample in samples:
        aspect = max(sample.target.size) / min(sample.target.size)
        for _ in range(1 if last_only else len(sample.spec["target"]["scene"]["objects"])):
            groups["<1.25" if aspect < 1.25 else "1.25-1.6" if aspect < 1.6 else ">=1.6"].append(n)
            n += 1
    return _split(label, groups, parts)


def _x0_errors(folder: str | Path, compositions: Sequence[Sample], budget: int) -> str:
    sigmas = (1.0, 0.7, 0.4)
    cells = [
        f"sigma {sigma}: {obj:.2f} / {bg:.2f} (objects: {tokens:.1%} of tokens, {error:.1%} of the error)"
        for sigma, (obj, bg, tokens, error) in zip(
            sigmas, x0_error_split(folder, compositions, budget, sigmas), strict=True
        )
    ]
    return "  x0 error as a fraction of the latent mean's, object / background tokens: " + "; ".join(cells)


def _cells(parts: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {np.mean(v):.3f} (≥0.5: {np.mean(np.asarray(v) >= 0.5):.2f})" for k, v in parts.items())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="tiny model folders")
    parser.add_argument("--n", type=int, default=24, help="validation compositions (and half as many edits)")
    parser.add_argument("--budget", type=int, default=128, help="reference and output budget side")
    parser.add_argument("--max-refs", type=int, default=4, help="largest K of the compositions")
    parser.add_argument("--edits", default="edit", help="edit tasks, e.g. 'add' or 'recolour,move'")
    parser.add_argument("--baselines", action="store_true", help="also score the trivial outputs")
    parser.add_argument("--grid", type=Path, help="also draw references | each model's output | target here")
    parser.add_argument(
        "--guidance", default="", help="true-CFG scales to sample each model at, e.g. '1,2,3' (default: its own)"
    )
    args = parser.parse_args(argv)
    scales = [float(g) for g in args.guidance.split(",") if g.strip()] or [None]
    sizes = SizeRange(48, 160)
    compositions = split_samples("val", args.n, TaskConfig(parse_tasks("compose"), args.max_refs, sizes))
    edits = split_samples("val", args.n // 2, TaskConfig(parse_tasks(args.edits), args.max_refs, sizes))
    reports = {}
    for folder in args.models:
        share, uniform = routing_share(folder, compositions, args.budget)
        bg_share, bg_uniform = routing_share(folder, compositions, args.budget, background=True)
        for guidance in scales:
            label = folder if guidance is None else f"{folder} guidance {guidance:g}"
            report, _ = eval_model(folder, compositions + edits, budget=args.budget, guidance=guidance)
            reports[label] = report
            comp = report.records[: len(compositions)]
            parts = object_scores(compositions, report.outputs[: len(compositions)])
            added = (
                object_scores(edits, report.outputs[len(compositions) :], last_only=True)
                if args.edits == "add"
                else None
            )
            print(f"{label} @{args.budget}²")
            print(f"  routing share {share:.3f} (uniform {uniform:.3f})")
            print(f"  background routing share {bg_share:.3f} (uniform {bg_uniform:.3f})")
            print(
                f"  overall: compositions {np.mean([r.score.overall for r in comp]):.3f} (n={len(comp)}), "
                f"edits {np.mean([r.score.overall for r in report.records[len(compositions) :]]):.3f} (n={len(edits)})"
            )
            print(f"  {len(parts['iou'])} placed objects: {_cells(parts)}", flush=True)
            if added is not None:
                print(f"  {len(added['iou'])} objects drawn by `add`: {_cells(added)}", flush=True)
                print(_aspect_split(edits, added, last_only=True, label="`add`: output aspect"))
            print(_facts_split(compositions, parts, args.budget), flush=True)
            print(_aspect_split(compositions, parts), flush=True)
            if guidance is None or guidance == scales[0]:  # the x̂0 error does not depend on guidance
                print(_x0_errors(folder, compositions, args.budget), flush=True)

    if args.baselines:
        from uniref.eval import evaluate_baselines

        for name, report in evaluate_baselines(compositions + edits).items():
            comp, rest = report.records[: len(compositions)], report.records[len(compositions) :]
            print(
                f"baseline {name}: overall compositions {np.mean([r.score.overall for r in comp]):.3f}, "
                f"edits {np.mean([r.score.overall for r in rest]):.3f}"
            )
    if args.grid:  # four compositions, then two edits
        sample_grid(compositions + edits, reports, args.grid, [0, 1, 2, 3, len(compositions), len(compositions) + 1])
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
