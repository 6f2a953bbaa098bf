"""The method's ablations, each from one command: train the arms that are not finished (resuming the
ones that stopped), evaluate every arm on the held-out test split with the exact metrics, and write its
section of docs/ablations.md with loss/reward curves and a sample grid (PNG, under docs/ablations/).

    python -m benchmarks.ablations sft      # (a) trained vs untrained, (b) budget schedule, (d) task mix
    python -m benchmarks.ablations budgets  # (c) SELF global budget vs per-image budgets, K = 4-6
    python -m benchmarks.ablations rl       # SFT only vs summed-reward GRPO vs MSGRPO; SDE window vs full
    python -m benchmarks.ablations rl --replicate 1  # the two window arms again, other seeds and prompts
    python -m benchmarks.ablations probes --round levers --minutes 30  # the recipe's levers, on the val split
    python -m benchmarks.ablations probes --round routing --minutes 50  # routing loss, fine-tuning the default

Arms are the YAML files in configs/ablations/ (each also runs alone with ``uniref train``); arms of a
study cost the same compute. ``--jobs`` arms train at once, each on ``--threads`` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks._report import write_section
from uniref.config import read_yaml
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.sample import Sample
from uniref.data.splits import split_samples
from uniref.eval import EvalReport, evaluate
from uniref.images import save_image
from uniref.viz import SheetRow, draw_sheet

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "ablations"
DOC = ROOT / "docs" / "ablations.md"
FIGURES = ROOT / "docs" / "ablations"
HEADER = (
    "# Ablations\n\nEvery table and figure here is written by `python -m benchmarks.ablations STUDY`; "
    "rerun it to refresh its section.\n"
)
GRID_ROWS = 6
SMOOTH = 10  # logged points per moving-average window in the curves
PAUSE = 600.0  # seconds: longer gaps between logged steps are resumes, not training time


# --- arms: train, find, export -------------------------------------------------------------------


def arm_config(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


# A replicate r > 0 reruns an arm with other noise seeds and other prompts: run.seed r and the data
# stream moved by r * REPLICATE_PROMPTS, into runs/ablations/replicate<r>/<arm>.
REPLICATE_PROMPTS = 100_000
REPLICATES = ROOT / "runs" / "ablations"  # replicate<r>/<arm>


def replicate_overrides(name: str, replicate: int) -> list[str]:
    if not replicate:
        return []
    offset = read_yaml(arm_config(name))["data"].get("seed_offset", 0) + replicate * REPLICATE_PROMPTS
    return [f"run.seed={replicate}", f"data.seed_offset={offset}", f"run.output_dir={arm_run(name, replicate)}"]


def arm_run(name: str, replicate: int = 0) -> Path:
    if replicate:
        return REPLICATES / f"replicate{replicate}" / name
    return ROOT / read_yaml(arm_config(name))["run"]["output_dir"]


def arm_finished(name: str, replicate: int = 0) -> bool:
    metrics = arm_run(name, replicate) / "metrics.jsonl"
    if not metrics.exists():
        return False
    target = read_yaml(arm_config(name))["train"]["max_steps"]
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return bool(steps) and max(steps) >= target and _checkpoint_step(name, replicate) >= target


def _checkpoint_step(name: str, replicate: int = 0) -> int:
    from uniref.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(arm_run(name, replicate))
    return int(ckpt.name.split("_")[-1]) if ckpt else -1


def train_arms(kind: str, names: Sequence[str], jobs: int, threads: int, replicate: int = 0) -> None:
    """Run ``uniref train KIND`` for every unfinished arm, ``jobs`` at a time (a rerun resumes)."""
    todo = [n for n in names if not arm_finished(n, replicate)]
    if not todo:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def run(name: str) -> None:
        log = arm_run(name, replicate).with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "uniref", "train", kind, "--config", str(arm_config(name)), "log.progress=false"]
        cmd += replicate_overrides(name, replicate)
        print(f"training {name}: {' '.join(cmd[2:])} (log: {log})", flush=True)
        with log.open("a") as out:
            code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"arm {name} failed with exit code {code}; see {log}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, todo))


def ensure_trained(kind: str, names: Sequence[str], args: argparse.Namespace, replicate: int = 0) -> None:
    """Train the unfinished arms (unless ``--no-train``), in the given order; stop with one line naming
    any arm that is still unfinished."""
    if not args.no_train:
        train_arms(kind, names, args.jobs, args.threads, replicate)
    missing = [n for n in names if not arm_finished(n, replicate)]
    if missing:
        raise SystemExit(f"arms not finished: {', '.join(missing)} (rerun without --no-train)")


def export_arm(name: str, replicate: int = 0) -> Path:
    """The arm's newest checkpoint (EMA weights for SFT) as a model folder ``<run>/export_step_N``."""
    from uniref.train.export import export_run

    step = _checkpoint_step(name, replicate)
    out = arm_run(name, replicate) / f"export_step_{step:08d}"
    if not (out / "uniref_model.json").exists():
        export_run(arm_run(name, replicate), out)
    return out


def metrics_rows(name: str, replicate: int = 0) -> list[dict]:
    return read_metrics(arm_run(name, replicate))


def read_metrics(run: Path) -> list[dict]:
    """The logged rows of a run folder's metrics.jsonl."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_hours(rows: Sequence[dict], key: str = "loss") -> float:
    """Wall hours between logged steps, leaving out pauses (stops and resumes)."""
    train = [r for r in rows if key in r]
    gaps = [b["time"] - a["time"] for a, b in zip(train, train[1:], strict=False)]
    return sum(g for g in gaps if g < PAUSE) / 3600


def smooth(values: Sequence[float], window: int = SMOOTH) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --- evaluation ------------------------------------------------------------------------------------


def eval_model(
    model: str | Path, samples: Sequence[Sample], budget: int | None = None, **kwargs: object
) -> tuple[EvalReport, float]:
    """Evaluate (outputs kept) and return the report and its wall seconds."""
    from uniref.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(str(model))
    start = time.perf_counter()
    report = evaluate(pipe, samples, budget=budget, target_budget=budget, keep_outputs=True, progress=False, **kwargs)
    return report, time.perf_counter() - start


def family_scores(report: EvalReport) -> dict[str, float]:
    """Mean ref consistency of single edits (K = 1) and of compositions (K >= 2)."""
    edits = [r.score.ref_consistency for r in report.records if r.k == 1]
    comps = [r.score.ref_consistency for r in report.records if r.k > 1]
    return {"edit": sum(edits) / max(1, len(edits)), "compose": sum(comps) / max(1, len(comps))}


def metric_cells(report: EvalReport) -> list[str]:
    return [
        f"{report.overall:.3f}",
        f"{report.ref_consistency:.3f}",
        f"{report.worst_ref_consistency:.3f}",
        f"{report.instruction_accuracy:.3f}",
        f"{report.quality:.3f}",
    ]


METRIC_HEADER = ["overall", "ref consistency", "worst ref", "instruction", "quality"]


def baseline_rows(baselines: dict[str, EvalReport], blanks: int) -> list[list[str]]:
    """One table row per trivial baseline (``uniref.eval.evaluate_baselines``): its label, ``blanks``
    empty cells, its metrics."""
    return [[f"*baseline: {name}*"] + [""] * blanks + metric_cells(report) for name, report in baselines.items()]


def sample_grid(
    samples: Sequence[Sample], reports: dict[str, EvalReport], out: Path, indices: Sequence[int] | None = None
) -> None:
    """Rows: references | each arm's output (in ``reports`` order) | target, for the samples at
    ``indices`` (default: the first GRID_ROWS)."""
    names = list(reports)
    rows = [
        SheetRow(
            list(samples[i].refs),
            [reports[n].outputs[i] for n in names] + [samples[i].target],
            f"[{samples[i].task}] {samples[i].instruction}",
        )
        for i in (indices if indices is not None else range(min(GRID_ROWS, len(samples))))
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(draw_sheet(rows), out)


def write(name: str, markdown: str) -> None:
    if not DOC.exists():
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(HEADER)
    write_section(name, markdown, DOC)


def test_samples(n: int, tasks: str, max_refs: int, min_refs: int = 1) -> list[Sample]:
    """The first ``n`` held-out test samples with ``min_refs <= K``, same for every arm."""
    config = TaskConfig(tasks=parse_tasks(tasks), max_refs=max_refs, size_range=SizeRange(48, 160))
    pool: list[Sample] = []
    drawn = n
    while len(pool) < n:
        pool = [s for s in split_samples("test", drawn, config) if s.k >= min_refs]
        drawn *= 2
    return pool[:n]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["sft", "budgets", "rl", "probes"])
    parser.add_argument("--n", type=int, default=64, help="held-out test samples per evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per arm")
    parser.add_argument("--minutes", type=float, default=30.0, help="probes only: wall time per arm")
    parser.add_argument("--no-train", action="store_true", help="only evaluate (arms must be finished)")
    parser.add_argument(
        "--round", choices=["levers", "routing"], default="levers", help="probes only: which round of arms"
    )
    parser.add_argument(
        "--arms", type=lambda v: v.split(","), default=None, help="sft only: a comma list of arms (default: all)"
    )
    parser.add_argument(
        "--replicate",
        type=int,
        default=0,
        help="rl only: rerun the two window arms with run.seed N and other prompts (N >= 1), report them apart",
    )
    args = parser.parse_args(argv)
    if args.replicate < 0 or (args.replicate and args.study != "rl"):
        parser.error(f"--replicate {args.replicate}: replicates are numbered 1, 2, ... and exist for the rl study only")
    if args.arms is not None:
        from benchmarks.ablations_sft import ARMS

        unknown = sorted(set(args.arms) - set(ARMS))
        if args.study != "sft" or unknown:
            problem = f"unknown arm(s) {', '.join(unknown)}" if unknown else "arms are chosen for the sft study only"
            parser.error(f"--arms {','.join(args.arms)}: {problem} (sft arms: {', '.join(ARMS)})")
    if args.study == "probes":
        from benchmarks import ablations_probes

        ablations_probes.run(args)
        return
    if args.study == "rl":
        from benchmarks import ablations_rl

        ablations_rl.run(args)
        return
    from benchmarks import ablations_sft

    (ablations_sft.run if args.study == "sft" else ablations_sft.run_budgets)(args)


if __name__ == "__main__":
    main()
