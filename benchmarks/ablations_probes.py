"""Probes (issue 17 §3): short runs of the new tiny recipe's levers at equal wall time, scored on the
**validation** split (never the test split), with the trivial baselines beside them.

Every arm is a whole recipe in configs/probes/; a probe trains it for ``--minutes`` of wall time (all
arms of a round under the same load: ``--jobs`` at once on ``--threads`` threads each), stops it with
SIGTERM (the trainer checkpoints and exits), and evaluates its EMA weights. The winner's run goes on
from its checkpoint: a probe is the first minutes of that run.

Rounds: ``levers`` trains the recipe's levers from scratch (codec, binding); ``routing`` fine-tunes the
second shipped ``tiny`` (commit c632883, materialised from git so a rerun starts from the same weights
whatever is shipped now) at 128² on a compose-heavy mix with and without the routing loss.

    python -m benchmarks.ablations probes --round levers --minutes 30
    python -m benchmarks.ablations probes --round routing --minutes 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks._report import markdown_table
from benchmarks.ablations import FIGURES, GRID_ROWS, ROOT, eval_model, read_metrics, sample_grid, train_hours, write
from uniref.config import read_yaml
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import EvalReport, evaluate_baselines

CONFIGS = ROOT / "configs" / "probes"
MARKER = "probe.json"  # written when a probe's wall time is used up: {"minutes", "steps"}
ROUNDS = {
    "levers": {
        "words": "pixels, words only (no binding)",
        "bind16": "pixels, binding 16 tokens/ref",
        "codec_words": "codec, words only",
        "codec_bind16": "codec, binding 16 tokens/ref",
    },
    "routing": {
        "ft_plain": "fine-tune, plain loss",
        "ft_route": "fine-tune, routing 0.2 + object tokens x3",
    },
}
SECTIONS = {"levers": "probes", "routing": "probes_routing"}
VAL_SETS = {"levers": "edit + compose", "routing": "of the edit family and as many of the compose family"}
# Starting weights of fine-tuning rounds: folder (as the configs name it) -> the commit that shipped them.
BASES = {"runs/probes/base_tiny": "c632883"}
K_COLUMNS = (("1", (1,)), ("2", (2,)), ("3", (3,)), ("4–6", (4, 5, 6)))


def arm_run(name: str) -> Path:
    return ROOT / read_yaml(CONFIGS / f"{name}.yaml")["run"]["output_dir"]


def probe_done(name: str, minutes: float) -> bool:
    marker = arm_run(name) / MARKER
    return marker.exists() and json.loads(marker.read_text())["minutes"] >= minutes


def materialise_base(name: str) -> None:
    """Write the arm's starting weights (a fine-tuning round) from the commit that shipped them."""
    folder = str(read_yaml(CONFIGS / f"{name}.yaml")["model"]["name"])
    if folder not in BASES or (ROOT / folder / "model.safetensors").exists():
        return
    (ROOT / folder).mkdir(parents=True, exist_ok=True)
    for file in ("model.safetensors", "uniref_model.json"):
        blob = subprocess.run(
            ["git", "show", f"{BASES[folder]}:src/uniref/assets/tiny/{file}"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        (ROOT / folder / file).write_bytes(blob)


def train_probe(name: str, minutes: float, threads: int) -> None:
    """Train one arm for ``minutes`` of wall time, then SIGTERM it (it checkpoints)."""
    materialise_base(name)
    run = arm_run(name)
    if run.exists():
        shutil.rmtree(run)  # a probe cut short has an unknown share of its time: start it over
    run.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "uniref", "train", "sft", "--config", str(CONFIGS / f"{name}.yaml")]
    cmd.append("log.progress=false")
    print(f"probe {name}: {minutes} min ({' '.join(cmd[2:])})", flush=True)
    with (run.parent / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    logged = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    steps = max((r["step"] for r in logged if "loss" in r), default=0)
    if proc.returncode not in (0, -signal.SIGTERM) or not steps:
        raise SystemExit(f"probe {name} failed (exit {proc.returncode}); see {run.parent / f'{name}.log'}")
    (run / MARKER).write_text(json.dumps({"minutes": minutes, "steps": steps}))


def checkpoint_steps(name: str) -> list[int]:
    from uniref.train.checkpoint import list_checkpoints

    return sorted(int(p.name.split("_")[-1]) for p in list_checkpoints(arm_run(name)))


def common_step(names: list[str]) -> int:
    """The latest step every arm has a checkpoint at: arms are compared at equal steps as well as
    equal wall time (a slower arm's extra steps are not counted; steps/s is in the table)."""
    shared = set.intersection(*(set(checkpoint_steps(n)) for n in names))
    if not shared:
        raise SystemExit(f"probes {', '.join(names)}: no checkpoint step in common")
    return max(shared)


def export_probe(name: str, step: int) -> Path:
    from uniref.train.export import export_run

    out = arm_run(name) / f"export_step_{step:08d}"
    if not (out / "uniref_model.json").exists():
        export_run(arm_run(name), out, step=step)
    return out


def val_samples(n: int, families: tuple[str, ...] = ("edit,compose",)) -> list:
    """The first ``n`` validation samples of each task family in ``families`` (K <= 6)."""
    configs = [TaskConfig(tasks=parse_tasks(f), max_refs=6, size_range=SizeRange(48, 160)) for f in families]
    return [s for config in configs for s in split_samples("val", n, config)]


def k_overall(report: EvalReport, ks: tuple[int, ...]) -> str:
    scores = [r.score.overall for r in report.records if r.k in ks]
    return f"{sum(scores) / len(scores):.3f}" if scores else "–"


def run(args: argparse.Namespace) -> None:
    arms = ROUNDS[args.round]
    names = list(arms)
    todo = [n for n in names if not probe_done(n, args.minutes)]
    if todo and not args.no_train:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda n: train_probe(n, args.minutes, args.threads), todo))
    missing = [n for n in names if not probe_done(n, args.minutes)]
    if missing:
        raise SystemExit(f"probes not trained for {args.minutes} min: {', '.join(missing)} (rerun without --no-train)")
    # The routing round is about compositions: as many of them as single edits, not 3 in 10.
    samples = val_samples(args.n) if args.round == "levers" else val_samples(args.n, ("edit", "compose"))
    reports: dict[str, EvalReport] = {}
    rows = []
    evaluated = common_step(names)
    for name in names:
        report, _ = eval_model(export_probe(name, evaluated), samples)
        reports[arms[name]] = report
        history = read_metrics(arm_run(name))
        steps = json.loads((arm_run(name) / MARKER).read_text())["steps"]
        hours = train_hours(history)
        rate = f"{steps / max(hours * 3600, 1e-9):.2f}"
        rows.append([arms[name], steps, rate, evaluated] + _score_cells(report))
    for folder in sorted({str(read_yaml(CONFIGS / f"{n}.yaml")["model"]["name"]) for n in names} & set(BASES)):
        report, _ = eval_model(ROOT / folder, samples)  # where a fine-tuning round starts from
        reports[f"start ({BASES[folder]})"] = report
        rows.append([f"*start: the weights of {BASES[folder]}*", 0, "", 0] + _score_cells(report))
    for base, report in evaluate_baselines(samples).items():
        rows.append([f"*baseline: {base}*", "", "", ""] + _score_cells(report))
    header = ["arm", "steps trained", "steps/s", "evaluated step", "overall"]
    header += [f"overall K={k}" for k, _ in K_COLUMNS]
    header += ["worst ref", "instruction"]
    section = SECTIONS[args.round]
    figure = f"{section}_samples.png"
    # The routing round's samples are edits then compositions: show some of each.
    half = GRID_ROWS // 2
    shown = None if args.round == "levers" else [*range(half), *range(args.n, args.n + half)]
    sample_grid(samples, reports, FIGURES / figure, shown)
    configs = ", ".join(f"`configs/probes/{n}.yaml`" for n in names)
    start = (
        "trains from scratch"
        if args.round == "levers"
        else "fine-tunes the `tiny` weights shipped at commit c632883 (compose-heavy mix, 128²)"
    )
    title = "the new tiny recipe's levers" if args.round == "levers" else "routing supervision on the shipped model"
    write(
        section,
        f"## Probes: {title} at equal wall time (issue 17 §3)\n\n"
        f"Command: `python -m benchmarks.ablations probes --round {args.round} --minutes {args.minutes:g} "
        f"--jobs {args.jobs} --threads {args.threads}`. Arms: {configs}; each {start} for {args.minutes:g} min of wall "
        f"time, {args.jobs} at once on {args.threads} thread(s) each (so steps/s are under that shared load), "
        f"and is scored with its EMA weights at step {evaluated}, the last step all arms reached (equal "
        f"steps: per-step costs are in the steps/s column), on the first {args.n} **validation** samples "
        f"({VAL_SETS[args.round]}, K ≤ 6). `overall` = √(instruction · worst ref) per sample.\n\n"
        + markdown_table(header, rows)
        + f"\n\n![probe samples](ablations/{figure})\n",
    )
    print(f"probes: wrote docs/ablations.md and docs/ablations/{figure}", flush=True)


def _score_cells(report: EvalReport) -> list[str]:
    cells = [f"{report.overall:.3f}"] + [k_overall(report, ks) for _, ks in K_COLUMNS]
    return cells + [f"{report.worst_ref_consistency:.3f}", f"{report.instruction_accuracy:.3f}"]
