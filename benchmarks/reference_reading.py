"""Does a model read the right reference, and would more reference tokens help? By K (issue 17 §3).

Four reports on the first ``--n`` validation compositions (``compose``, K = 2..``--max-refs``), grouped
K = 2 / 3 / 4 / 5+:

* ``shares``: of the attention a target token gives to reference tokens, the share on the right
  place (``uniref.train.routing``; noise seed 0, one batch per group): a placed object's tokens on its
  source object, and background tokens on the background picture, each beside a uniform reader's;
* ``budgets``: ``overall`` with the references planned under each of ``--budgets`` (side of the
  square pixel budget, SELF global), the output at the model's own budget: whether reading the same
  pictures at more tokens helps a model trained at one budget (``--tasks edit`` for single edits);
* ``scales`` (no model): how many tokens wide a placed object is in its source reference, with the
  references planned under each of ``--budgets``, against its width in the output at ``--budget``:
  whether the model must draw an object larger than any picture shows it;
* ``order``: each placed object's score (``uniref.rewards``: shape, colour, pattern and place against
  its source) by where the instruction names it (1st, 2nd, 3rd and later), the background picture's
  score, how often the output's background is closer to the named picture's than to any other
  picture's, and how often every object scores ≥ 0.5: whether a model places the first object named
  and drops the rest, and whether it takes the wrong picture's background; then that last share by
  K and by which picture the instruction names (1..K): whether "picture 4" is read as well as "picture 1";
  then the placed objects' scores split by how the instruction names them: "the object from picture
  N" (only the picture's number tells which) against a description ("the star", "the red shape"):
  whether a model finds a reference by its number or by matching words to what it shows.

    python -m benchmarks.reference_reading shares MODEL... [--n 64]
    python -m benchmarks.reference_reading budgets MODEL --budgets 128,192,256 [--n 64] [--tasks edit]
    python -m benchmarks.reference_reading scales --budgets 128,176 [--n 600]
    python -m benchmarks.reference_reading order MODEL... [--n 64] [--tasks pick]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from benchmarks.routing_diagnostics import routing_share
from uniref.budget import Size, plan, plan_target
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.sample import Sample
from uniref.data.scenes import Scene
from uniref.data.splits import split_samples
from uniref.eval import EvalReport, baseline_output, evaluate, evaluate_baselines
from uniref.models.tiny import SHIPPED_DIR
from uniref.pipeline import EditPipeline
from uniref.rewards.metrics import Scorer


def _group(k: int) -> str:
    return f"K = {k}" if k < 5 else "K = 5+"


def by_k(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.k):
        groups.setdefault(_group(s.k), []).append(s)
    return groups


def share_rows(model: str, samples: Sequence[Sample], budget: int) -> list[str]:
    folder = SHIPPED_DIR if model == "tiny" else model
    rows = []
    for name, group in by_k(samples).items():
        obj, obj_uniform = routing_share(folder, group, budget)
        bg, bg_uniform = routing_share(folder, group, budget, background=True)
        rows.append(
            f"| {model} | {name} | {len(group)} | {obj:.3f} | {obj_uniform:.3f} | {bg:.3f} | {bg_uniform:.3f} |"
        )
    return rows


def budget_row(pipe: EditPipeline, samples: Sequence[Sample], budget: int) -> str:
    report = evaluate(pipe, samples, budget=budget, progress=False)
    groups: dict[str, list[float]] = {}
    for record in report.records:
        groups.setdefault(_group(record.k), []).append(record.score.overall)
    cells = " | ".join(f"{np.mean(v):.3f} (n = {len(v)})" for _, v in sorted(groups.items()))
    return f"| {budget}² | {report.overall:.3f} | {cells} |"


def contestants(
    models: Sequence[str], samples: Sequence[Sample]
) -> Iterator[tuple[str, EvalReport, Sequence[Image.Image]]]:
    """Each model's evaluation of ``samples`` with its outputs, then each trivial baseline's, as
    (row label, report, outputs)."""
    for model in models:
        report = evaluate(EditPipeline.from_pretrained(model), samples, progress=False, keep_outputs=True)
        yield model, report, report.outputs
    for name, report in evaluate_baselines(samples).items():
        yield f"*baseline: {name}*", report, [baseline_output(name, samples, i) for i in range(len(samples))]


def takes_named_background(sample: Sample, output: Image.Image, named: int) -> bool:
    """Whether ``output``'s background (pixels no target object covers) is closer to the background of
    picture ``named`` (0-based: the one the instruction names) than to any other picture's."""
    scorer = Scorer(sample)
    likes = [scorer.background_like(output, Scene.from_json(ref["scene"])) for ref in sample.spec["refs"]]
    return int(np.argmax(likes)) == named


def named_taken(report: EvalReport, samples: Sequence[Sample], outputs: Sequence[Image.Image]) -> list[bool]:
    """Per sample of ``report`` (an evaluation of ``samples`` with these ``outputs``): whether its output
    takes the background of the picture the instruction names."""
    return [
        takes_named_background(sample, output, record.roles.index("background"))
        for record, sample, output in zip(report.records, samples, outputs, strict=True)
    ]


def order_rows(name: str, report: EvalReport, taken: Sequence[bool]) -> list[str]:
    """Per K group of ``report`` (an evaluation of ``compose`` samples; ``taken`` from :func:`named_taken`):
    placed-object scores by the object's place in the instruction (``compose`` lists objects in that
    order), the background's score, the share of outputs whose background is the named picture's rather
    than another picture's, and the share with every object ≥ 0.5. ``name`` labels the rows."""
    groups: dict[str, list[tuple[dict, bool]]] = {}
    for record, took in zip(report.records, taken, strict=True):
        groups.setdefault(_group(record.k), []).append((record.score.details, took))
    rows = []
    for group, items in sorted(groups.items()):
        details = [d for d, _ in items]
        objects = [d["objects"] for d in details]
        by_place = [[o[j] for o in objects if len(o) > j] for j in range(2)]
        later = [v for o in objects for v in o[2:]]
        cells = [f"{np.mean(v):.3f}" if v else "–" for v in [*by_place, later]]
        every = np.mean([all(v >= 0.5 for v in o) for o in objects])
        background = np.mean([d["background"] for d in details])
        named = np.mean([took for _, took in items])
        rows.append(
            f"| {name} | {group} | {len(details)} | {' | '.join(cells)} | {background:.3f} | {named:.2f} "
            f"| {every:.2f} |"
        )
    return rows


def named_index_rows(name: str, report: EvalReport, taken: Sequence[bool], max_refs: int) -> list[str]:
    """Per K, the share of outputs that take the named picture's background (``taken``), split by which
    picture (1..``max_refs``) the instruction names, each cell as ``share (n)``."""
    cells: dict[int, dict[int, list[bool]]] = {}
    for record, took in zip(report.records, taken, strict=True):
        cells.setdefault(record.k, {}).setdefault(record.roles.index("background"), []).append(took)
    rows = []
    for k, by_named in sorted(cells.items()):
        row = [f"{np.mean(v):.2f} ({len(v)})" if (v := by_named.get(i)) else "–" for i in range(max_refs)]
        rows.append(f"| {name} | K = {k} | {' | '.join(row)} |")
    return rows


# "<the desc> from <picture N>": a compose phrase's description is one or two words after "the".
_OBJECT_PHRASE = re.compile(r"\bthe ((?:[a-z]+ )?[a-z]+) from (?:picture \d+|image \d+|the [a-z]+ (?:picture|image))")


def object_phrases(instruction: str, n: int) -> list[str]:
    """The descriptions the first ``n`` placed objects of a ``compose`` instruction are named by, in
    order ("object" when only the picture's number tells which)."""
    found = [m.group(1) for m in _OBJECT_PHRASE.finditer(instruction)]
    if len(found) < n:
        raise ValueError(f"{instruction!r}: found {len(found)} object phrases, expected {n}")
    return found[:n]


def naming_rows(name: str, report: EvalReport, samples: Sequence[Sample]) -> list[str]:
    """Per K group, the mean placed-object score when the instruction names the object only by its
    picture ("the object from picture N") and when it describes it, each with its count."""
    groups: dict[str, dict[bool, list[float]]] = {}
    for record, sample in zip(report.records, samples, strict=True):
        scores = record.score.details["objects"]
        for phrase, score in zip(object_phrases(sample.instruction, len(scores)), scores, strict=False):
            groups.setdefault(_group(record.k), {}).setdefault(phrase == "object", []).append(score)
    rows = []
    for group, split in sorted(groups.items()):
        cells = [f"{np.mean(v):.3f} ({len(v)})" if (v := split.get(only)) else "–" for only in (True, False)]
        rows.append(f"| {name} | {group} | {' | '.join(cells)} |")
    return rows


def object_widths(sample: Sample, ref_budget: int, out_budget: int, token_px: int) -> list[tuple[float, float]]:
    """(width in its source reference, width in the output), in tokens, of each placed object.

    Widths are the objects' diameters (spec ``size`` × short side of the planned picture); the
    source object is the one in the contributing reference with the placed object's shape (distractors
    never share it; a ``transfer`` recipient may have changed colour or pattern).
    """
    spec = sample.spec
    planned = plan([Size(r["width"], r["height"]) for r in spec["refs"]], ref_budget**2, token_px).sizes
    target = spec["target"]
    out = plan_target(out_budget**2, token_px, like=Size(target["width"], target["height"]))
    placed = target["scene"]["objects"]
    widths = []
    for ref, size in zip(spec["refs"], planned, strict=True):
        for part in ref["contributes"]:
            if part["what"] != "object":
                continue
            obj = placed[part["object"]]
            source = next(o for o in ref["scene"]["objects"] if o["shape"] == obj["shape"])
            widths.append((source["size"] * min(size.width, size.height) / token_px, obj["size"] * min(out) / token_px))
    return widths


def scale_rows(samples: Sequence[Sample], budgets: Sequence[int], out_budget: int, token_px: int) -> list[str]:
    rows = []
    for side in budgets:
        for name, group in by_k(samples).items():
            w = np.array([pair for s in group for pair in object_widths(s, side, out_budget, token_px)])
            rows.append(
                f"| {side}² | {name} | {len(w)} | {w[:, 0].mean():.2f} | {w[:, 1].mean():.2f} "
                f"| {np.median(w[:, 1] / w[:, 0]):.2f} |"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", choices=["shares", "budgets", "scales", "order"])
    parser.add_argument("models", nargs="*", help="`tiny` or tiny model folders (not for `scales`)")
    parser.add_argument("--n", type=int, default=64, help="validation compositions")
    parser.add_argument("--max-refs", type=int, default=6)
    parser.add_argument(
        "--tasks",
        default="compose",
        help="`budgets`: task family or names (`edit`: K = 1); `order`: tasks with a background picture "
        "(`compose`, or the `pick` drill to see whether the drill itself was learned)",
    )
    parser.add_argument(
        "--budget", type=int, default=128, help="`shares`: reference and output budget side; `scales`: output"
    )
    parser.add_argument("--budgets", default="128,192,256", help="`budgets`, `scales`: reference budget sides")
    parser.add_argument("--token-px", type=int, default=8, help="`scales`: pixels per token side (tiny: 8)")
    args = parser.parse_args(argv)
    if (args.report == "scales") == bool(args.models):
        parser.error("`scales` takes no model; `shares` and `budgets` need at least one")
    tasks = parse_tasks(args.tasks if args.report in ("budgets", "order") else "compose")
    samples = split_samples("val", args.n, TaskConfig(tasks, args.max_refs, SizeRange(48, 160)))
    if args.report == "scales":
        out = f"in the output ({args.budget}²)"
        print(
            f"| reference budget | group | placed objects | tokens wide in source | {out} | output / source (median) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(scale_rows(samples, [int(b) for b in args.budgets.split(",")], args.budget, args.token_px)))
        return
    if args.report == "order":
        print(
            "| model | group | n | 1st object named | 2nd | 3rd and later | background "
            "| background is the named picture's | every object ≥ 0.5 |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

        named: list[str] = []
        naming: list[str] = []  # stays empty for the `pick` drill, which places no object
        for name, report, outputs in contestants(args.models, samples):
            taken = named_taken(report, samples, outputs)
            print("\n".join(order_rows(name, report, taken)), flush=True)
            named += named_index_rows(name, report, taken, args.max_refs)
            naming += naming_rows(name, report, samples)
        pictures = [f"picture {i + 1} named" for i in range(args.max_refs)]
        print(f"\n| model | K | {' | '.join(pictures)} |\n|---|---|{'---:|' * args.max_refs}")
        print("\n".join(named))
        if naming:
            print('\n| model | group | object named only by its picture ("the object from picture N") | described |')
            print("|---|---|---:|---:|\n" + "\n".join(naming))
        return
    if args.report == "shares":
        print("| model | group | n | object share | uniform | background share | uniform |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for folder in args.models:
            print("\n".join(share_rows(folder, samples, args.budget)), flush=True)
        return
    groups = list(by_k(samples))
    for model in args.models:
        pipe = EditPipeline.from_pretrained(model)
        print(f"{model}\n| reference budget | overall | {' | '.join(groups)} |\n|---|---:|{'---:|' * len(groups)}")
        for side in (int(b) for b in args.budgets.split(",")):
            print(budget_row(pipe, samples, side), flush=True)


if __name__ == "__main__":
    main()
