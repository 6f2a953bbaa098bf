"""Which sampler noise level a model should ship with (issue 17): `overall` by the model card's groups.

On the model card's sample sets of the **validation** split (``--n`` single edits and ``--n``
compositions, K = 2..6), the model samples at every ``--levels`` value (0: the Euler ODE; > 0: the SDE
sampler that shares its marginals, ``EditPipeline.generate(noise_level=...)``). Each level after the first
is compared with the first on the same samples and seeds: the mean paired difference of `overall` and
its 95 % bootstrap interval per group, so a level is chosen only when its gain is more than noise;
the trivial baselines' rows close the table.

    python -m benchmarks.noise_level tiny --levels 0,0.25,0.5,0.75 --n 64
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from benchmarks.ablations_rl import paired_bootstrap
from benchmarks.model_card import _bucket
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import EvalReport, SampleRecord, evaluate, evaluate_baselines
from uniref.pipeline import EditPipeline


def _subset(report: EvalReport, group: str) -> EvalReport:
    records: list[SampleRecord] = [r for r in report.records if _bucket(r) == group]
    return EvalReport.from_records(records, report.settings)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="registry name or model folder")
    parser.add_argument("--levels", default="0,0.25,0.5,0.75", help="noise levels; the first is the reference")
    parser.add_argument("--n", type=int, default=64, help="validation single edits, and as many compositions")
    parser.add_argument("--max-refs", type=int, default=6)
    args = parser.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",")]
    size_range = SizeRange(48, 160)
    samples = [
        *split_samples("val", args.n, TaskConfig(tasks=parse_tasks("edit"), size_range=size_range)),
        *split_samples(
            "val", args.n, TaskConfig(tasks=parse_tasks("compose"), max_refs=args.max_refs, size_range=size_range)
        ),
    ]
    pipe = EditPipeline.from_pretrained(args.model)
    reports = {level: evaluate(pipe, samples, noise_level=level, progress=False) for level in levels}
    groups = sorted({_bucket(r) for r in reports[levels[0]].records})
    print(f"{args.model}, validation split: `overall` by noise level (Δ: paired vs {levels[0]:g}, 95 % interval)\n")
    print(
        "| noise level | "
        + " | ".join(f"{g} (n = {len(_subset(reports[levels[0]], g).records)})" for g in groups)
        + " |"
    )
    print("|---:|" + "---:|" * len(groups))
    for level, report in reports.items():
        cells = []
        for g in groups:
            mean = float(np.mean([r.score.overall for r in _subset(report, g).records]))
            if level == levels[0]:
                cells.append(f"{mean:.3f}")
            else:
                d, lo, hi = paired_bootstrap(_subset(reports[levels[0]], g), _subset(report, g), "overall")
                cells.append(f"{mean:.3f} (Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}])")
        print(f"| {level:g} | " + " | ".join(cells) + " |", flush=True)
    for name, report in evaluate_baselines(samples).items():  # what a trivial output scores here
        cells = [f"{np.mean([r.score.overall for r in _subset(report, g).records]):.3f}" for g in groups]
        print(f"| *baseline: {name}* | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
