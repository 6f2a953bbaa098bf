"""RL ablations (issue 7 §4): SFT only vs GRPO with the summed reward vs MSGRPO, and the SDE window vs
the full trajectory. Run through ``python -m benchmarks.ablations rl``; see that module.
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from benchmarks._report import markdown_table, save_figure
from benchmarks.ablations import (
    FIGURES,
    METRIC_HEADER,
    REPLICATE_PROMPTS,
    REPLICATES,
    arm_config,
    arm_finished,
    baseline_rows,
    ensure_trained,
    eval_model,
    export_arm,
    metric_cells,
    metrics_rows,
    sample_grid,
    smooth,
    test_samples,
    write,
)
from uniref.config import read_yaml
from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import METRICS, EvalReport, evaluate_baselines

ARMS = {
    "rl_raw_sum": "GRPO, summed reward (window 3)",
    "rl_reconcile": "MSGRPO, reconcile (window 3)",
    "rl_full": "MSGRPO, reconcile, full trajectory",
}
VAL_KEY = "val/worst_ref_consistency"


def training_seconds(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, cumulative seconds of rollout + update) for every logged training step."""
    out, total = [], 0.0
    for r in rows:
        if "step_seconds" in r:
            total += r["step_seconds"]
            out.append((r["step"], total))
    return out


def seconds_at(clock: list[tuple[int, float]], step: int) -> float:
    return next((t for s, t in clock if s >= step), clock[-1][1])


def time_to_reach(rows: list[dict], level: float) -> float | None:
    """Training seconds until validation worst-ref first reaches ``level`` (None: never)."""
    clock = training_seconds(rows)
    for r in rows:
        if VAL_KEY in r and r[VAL_KEY] >= level:
            return seconds_at(clock, r["step"])
    return None


def curves(base_val: float, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110)
    for name, label in ARMS.items():
        rows = metrics_rows(name)
        train = [r for r in rows if "reward/worst_ref" in r]
        steps = [r["step"] for r in train]
        axes[0].plot(steps, smooth([r["reward/worst_ref"] for r in train]), label=f"{label}: worst ref")
        axes[0].plot(steps, smooth([r["reward/ref_mean"] for r in train]), ls=":", label=f"{label}: mean ref")
        val = [r for r in rows if VAL_KEY in r]
        clock = training_seconds(rows)
        axes[1].plot([0] + [r["step"] for r in val], [base_val] + [r[VAL_KEY] for r in val], marker="o", label=label)
        axes[2].plot(
            [0] + [seconds_at(clock, r["step"]) / 60 for r in val],
            [base_val] + [r[VAL_KEY] for r in val],
            marker="o",
            label=label,
        )
    axes[0].set(xlabel="RL step", ylabel="training reward (moving average)", title="rollout rewards")
    axes[1].set(xlabel="RL step", ylabel="worst-ref consistency", title="validation (32 val prompts)")
    axes[2].set(xlabel="training minutes (rollouts + updates)", ylabel="worst-ref consistency", title="by wall time")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, FIGURES / out_png)


def run(args: argparse.Namespace) -> None:
    if args.replicate:
        run_replicate(args)
        return
    ensure_trained("rl", sorted(ARMS, key=lambda n: n != "rl_full"), args)  # longest arm first: the pool ends sooner
    cfg = read_yaml(arm_config("rl_reconcile"))
    max_refs, budget = cfg["data"]["max_refs"], cfg["rl"]["budget"]
    # Compositions only: the claim is about trading references against each other.
    samples = test_samples(args.n, "compose", max_refs=max_refs)
    models = {"SFT only (embedded default)": "tiny"} | {ARMS[n]: export_arm(n) for n in ARMS}
    reports: dict[str, EvalReport] = {}
    for label, model in models.items():
        reports[label], _ = eval_model(model, samples, budget=budget)
    # The arms' own validation prompts (Observer's), for the curves' step 0.
    val_config = TaskConfig(
        tasks=parse_tasks(",".join(cfg["data"]["task_mix"])), max_refs=max_refs, size_range=SizeRange.parse("48:160")
    )
    val = split_samples("val", cfg["log"]["val_samples"], val_config)
    base_report = eval_model("tiny", val, budget=budget, steps=cfg["log"]["val_steps"])[0]
    base_val = base_report.worst_ref_consistency
    # Validation (the arms' task mix, edits included) before RL and at each arm's last step.
    val_rows = [["SFT only (embedded default)", "0"] + metric_cells(base_report)]
    for name, label in ARMS.items():
        last = [r for r in metrics_rows(name) if VAL_KEY in r][-1]
        val_rows.append([label, str(last["step"])] + [f"{last[f'val/{m}']:.3f}" for m in METRICS])

    rows = []
    for label, report in reports.items():
        name = next((n for n, lab in ARMS.items() if lab == label), None)
        arm_rows = metrics_rows(name) if name else []
        clock = training_seconds(arm_rows)
        minutes = f"{clock[-1][1] / 60:.1f}" if clock else "–"
        steps = str(clock[-1][0]) if clock else "0"
        rows.append([label, steps, minutes] + metric_cells(report))
    header = ["arm", "RL steps", "train min"] + METRIC_HEADER
    sft = reports["SFT only (embedded default)"]
    deltas = [
        [label] + [f"{getattr(r, m) - getattr(sft, m):+.3f}" for m in METRICS]
        for label, r in reports.items()
        if r is not sft
    ]
    window_rows, full_rows = metrics_rows("rl_reconcile"), metrics_rows("rl_full")
    best = [max((r[VAL_KEY] for r in rs if VAL_KEY in r), default=float("nan")) for rs in (window_rows, full_rows)]
    level = min(best)
    t_window, t_full = time_to_reach(window_rows, level), time_to_reach(full_rows, level)
    if level > base_val and t_window and t_full:
        speed = (
            f"Validation worst-ref {level:.3f} (the lower of the two arms' best; SFT only: {base_val:.3f}) was first "
            f"reached after {t_window / 60:.1f} training minutes with the window and {t_full / 60:.1f} with the full "
            f"trajectory: **{t_full / t_window:.2f}×** less time with the window."
        )
    else:
        speed = (
            f"No common improvement to time: best validation worst-ref {best[0]:.3f} (window) and {best[1]:.3f} "
            f"(full) against {base_val:.3f} before RL, so time-to-reward is not measured here."
        )
    per_step = [training_seconds(rs)[-1][1] / max(1, training_seconds(rs)[-1][0]) for rs in (window_rows, full_rows)]
    curves(base_val, "rl_curves.png")
    sample_grid(samples, reports, FIGURES / "rl_samples.png")
    rl = cfg["rl"]
    text = f"""## MSGRPO: SFT only vs summed-reward GRPO vs multi-source GRPO (issue 7)

Command: `python -m benchmarks.ablations rl --n {args.n} --jobs {args.jobs} --threads {args.threads}`
(arms: `configs/ablations/rl_*.yaml`; all start from the shipped tiny model, see the same prompts, noise
seeds and SDE windows, with P = {rl["prompts_per_step"]} prompts × G = {rl["group_size"]} samples,
T = {rl["sample_steps"]} sampler steps, lr {cfg["optim"]["lr"]:g}, KL coefficient {rl["kl_coef"]:g},
reward weights {", ".join(f"{k} {v:g}" for k, v in rl["weights"].items())}).

Held-out **test** compositions (compose, transfer, conflict; K = 2–{max_refs}), the same {args.n} for every arm,
reference and target budget {budget}², 20 sampler steps (ODE). The two window-3 arms cost the same compute
per step; the full-trajectory arm trains on 3× as many steps per rollout.

{markdown_table(header, rows)}

Change against SFT only:

{markdown_table(["arm", "ref consistency", "worst ref", "instruction", "quality"], deltas)}

Validation prompts of the runs ({len(val)} from the val split, the arms' own task mix with edits,
{cfg["log"]["val_steps"]} sampler steps), before RL and at the last step:

{markdown_table(["arm", "RL step"] + METRIC_HEADER, val_rows)}

**SDE window vs full trajectory.** Mean training seconds per RL step: {per_step[0]:.1f} (window 3) vs
{per_step[1]:.1f} (full, 9 steps): {per_step[1] / per_step[0]:.2f}× per step. {speed}

![reward curves](ablations/rl_curves.png)

Sample grid (test compositions; outputs left to right: {", ".join(models)}; then the target):

![samples](ablations/rl_samples.png)
"""
    write("rl", text)
    print(text)


# --- replicates: is the aggregator gap larger than run-to-run noise? -------------------------------

REPLICATE_ARMS = ("rl_raw_sum", "rl_reconcile")
BOOTSTRAP = 2000
PAIRED_METRICS = (
    ("overall", "overall"),
    ("worst_ref", "worst ref"),
    ("ref_consistency", "ref consistency"),
    ("instruction", "instruction"),
    ("quality", "quality"),
)


def paired_bootstrap(a: EvalReport, b: EvalReport, attr: str) -> tuple[float, float, float]:
    """Mean of b − a over the same samples and its 95% bootstrap interval (samples resampled)."""
    d = np.array([getattr(y.score, attr) - getattr(x.score, attr) for x, y in zip(a.records, b.records, strict=True)])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def finished_replicates() -> list[int]:
    """Replicates whose two arms are finished on disk; 0 is the main study's own runs."""
    found = [0] if all(arm_finished(n) for n in REPLICATE_ARMS) else []
    for path in sorted(REPLICATES.glob("replicate*")):
        match = re.fullmatch(r"replicate(\d+)", path.name)
        if match and all(arm_finished(n, int(match[1])) for n in REPLICATE_ARMS):
            found.append(int(match[1]))
    return found


def run_replicate(args: argparse.Namespace) -> None:
    """Train the two window arms again with other seeds and prompts; compare them with a paired bootstrap
    over the test samples, for every finished replicate on disk."""
    ensure_trained("rl", REPLICATE_ARMS, args, replicate=args.replicate)
    replicates = sorted(set(finished_replicates()) | {args.replicate})
    cfg = read_yaml(arm_config("rl_reconcile"))
    max_refs, budget = cfg["data"]["max_refs"], cfg["rl"]["budget"]
    samples = test_samples(args.n, "compose", max_refs=max_refs)
    sft, _ = eval_model("tiny", samples, budget=budget)
    rows = [["SFT only (embedded default)", "–", "0", "–", "–"] + metric_cells(sft)]
    rows += baseline_rows(evaluate_baselines(samples), blanks=4)
    gaps, pooled = [], {}
    for r in replicates:
        reports = {}
        for name in REPLICATE_ARMS:
            reports[name], _ = eval_model(export_arm(name, r), samples, budget=budget)
            arm_rows = metrics_rows(name, r)
            clock = training_seconds(arm_rows)
            conflict = [x["ref_conflict"] for x in arm_rows if "ref_conflict" in x]  # logged since 3ac2989
            conflict_cell = f"{np.mean(conflict):.3f}" if conflict else "–"
            rows.append(
                [ARMS[name], str(r), str(clock[-1][0]), f"{clock[-1][1] / 60:.1f}", conflict_cell]
                + metric_cells(reports[name])
            )
        pairs = {
            "reconcile − raw_sum": (reports["rl_raw_sum"], reports["rl_reconcile"]),
            "reconcile − SFT only": (sft, reports["rl_reconcile"]),
            "raw_sum − SFT only": (sft, reports["rl_raw_sum"]),
        }
        for attr, label in PAIRED_METRICS:
            for pair, (a, b) in pairs.items():
                mean, lo, hi = paired_bootstrap(a, b, attr)
                gaps.append([str(r), label, pair, f"{mean:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]"])
                pooled.setdefault((label, pair), []).append(mean)
    seeds_rows = [
        [label, pair, f"{np.mean(v):+.3f}", f"{min(v):+.3f}", f"{max(v):+.3f}"] for (label, pair), v in pooled.items()
    ]
    header = ["arm", "replicate", "RL steps", "train min", "mean ref_conflict"] + METRIC_HEADER
    runs = "; ".join(
        f"Replicate {r}: run.seed {r}, data.seed_offset + {r * REPLICATE_PROMPTS:,} (other prompts)"
        if r
        else "Replicate 0: the configs as they are"
        for r in replicates
    )
    rl = cfg["rl"]
    text = f"""## MSGRPO vs summed GRPO vs SFT only: replicates (issues 7 and 17)

Command: `python -m benchmarks.ablations rl --replicate N --n {args.n} --jobs {args.jobs} --threads {args.threads}`
for N = {", ".join(map(str, replicates))} (the section lists every finished replicate on disk). Both arms start
from the embedded default (`tiny`, as shipped when the runs were made) and differ only in how the reward
sources are combined: `configs/ablations/rl_raw_sum.yaml` (Flow-GRPO's summed reward) and
`configs/ablations/rl_reconcile.yaml` (MSGRPO: per-source group normalisation, reconciling aggregator);
{cfg["train"]["max_steps"]} RL steps of P = {rl["prompts_per_step"]} prompts × G = {rl["group_size"]} samples,
T = {rl["sample_steps"]} sampler steps with the SDE in a window of {rl["window"]}, lr {cfg["optim"]["lr"]:g},
reward weights {", ".join(f"{k} {v:g}" for k, v in rl["weights"].items())}. {runs}; the two arms of a
replicate see the same prompts and noise. Held-out **test** compositions (compose, transfer, conflict;
K = 2–{max_refs}), the same {args.n} for every row, reference and target budget {budget}², 20 sampler
steps (ODE). `mean ref_conflict` is the training log's mean share of group pairs whose references rank
oppositely (the only pairs where a summed reward can trade one reference for another).

{markdown_table(header, rows)}

Paired differences on the same test samples, with a 95% paired bootstrap interval over the samples
({BOOTSTRAP} resamples; it covers test-sample noise, not training noise):

{markdown_table(["replicate", "metric", "difference", "mean", "95% interval"], gaps)}

Across the {len(replicates)} replicates (training noise): the per-replicate mean differences, their mean and range:

{markdown_table(["metric", "difference", "mean over replicates", "min", "max"], seeds_rows)}
"""
    write("rl_replicates", text)
    print(text)
