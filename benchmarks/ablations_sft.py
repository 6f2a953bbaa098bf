"""SFT ablations (issue 6 §7): trained vs untrained, the progressive budget, the task mix, SELF's budget.

Run through ``python -m benchmarks.ablations sft`` / ``budgets``; see that module.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._report import markdown_table, save_figure
from benchmarks.ablations import (
    FIGURES,
    METRIC_HEADER,
    ROOT,
    arm_config,
    baseline_rows,
    ensure_trained,
    eval_model,
    export_arm,
    family_scores,
    metric_cells,
    metrics_rows,
    sample_grid,
    smooth,
    test_samples,
    train_hours,
    write,
)
from uniref.budget import PlanMode, Size, plan
from uniref.config import read_yaml
from uniref.eval import EvalReport, evaluate_baselines

ARMS = {
    "sft_progressive": "progressive 64² → 96² → 128²",
    "sft_fixed64": "fixed 64²",
    "sft_fixed128": "fixed 128²",
    "sft_compose_only": "fixed 64², compositions only",
}
EVAL_BUDGETS = (64, 128)


def compute_units(name: str) -> float:
    """Σ steps × (budget / 64)² × batch / 16 over the arm's stages (or a config file's):
    optimizer steps at 64², batch 16."""
    stages = read_yaml(arm_config(name) if "/" not in name else name)["stages"]
    return sum(s["steps"] * (s["budget"] / 64) ** 2 * s["batch_size"] / 16 for s in stages)


def curves(out_png: str, arms: dict[str, str]) -> None:
    """Training loss and validation ref consistency of every arm against compute spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for name, label in arms.items():
        rows = metrics_rows(name)
        stages = read_yaml(arm_config(name))["stages"]
        spent, per_step = [], []
        for s in stages:
            per_step += [(s["budget"] / 64) ** 2 * s["batch_size"] / 16] * s["steps"]
        for step in range(len(per_step)):
            spent.append((spent[-1] if spent else 0.0) + per_step[step])

        def at(step: int, spent: list[float] = spent) -> float:
            return spent[min(step, len(spent)) - 1]

        train = [r for r in rows if "loss" in r]
        ax_loss.plot([at(r["step"]) for r in train], smooth([r["loss"] for r in train]), lw=1, label=label)
        val = [r for r in rows if "val/ref_consistency" in r]
        ax_val.plot([at(r["step"]) for r in val], [r["val/ref_consistency"] for r in val], marker="o", label=label)
    ax_loss.set(xlabel="compute (optimizer steps at 64², batch 16)", ylabel="x0 MSE (moving average)", yscale="log")
    ax_loss.set_title("training loss (each arm at its own budget)")
    ax_val.set(xlabel="compute (optimizer steps at 64², batch 16)", ylabel="ref consistency")
    ax_val.set_title("validation (16 val samples, at the arm's current budget)")
    ax_val.legend(fontsize=8)
    save_figure(fig, FIGURES / out_png)


def run(args: argparse.Namespace) -> None:
    arms = {n: ARMS[n] for n in (args.arms or ARMS)}
    ensure_trained("sft", list(arms), args)
    samples = test_samples(args.n, "edit,compose", max_refs=6)
    models = {label: export_arm(n) for n, label in arms.items()}
    reports: dict[int, dict[str, EvalReport]] = {b: {} for b in EVAL_BUDGETS}
    for budget in EVAL_BUDGETS:
        for label, model in models.items():
            reports[budget][label], _ = eval_model(model, samples, budget=budget)

    rows = []
    for name, label in arms.items():
        units = f"{compute_units(name):.0f}"
        hours = f"{train_hours(metrics_rows(name)):.2f}"
        fam = family_scores(reports[128][label])
        rows.append(
            [label, units, hours]
            + metric_cells(reports[64][label])
            + metric_cells(reports[128][label])
            + [f"{fam['edit']:.3f}", f"{fam['compose']:.3f}"]
        )
    # A trivial output is scored the same whatever the evaluation budget: one row serves both columns.
    baselines = evaluate_baselines(samples)
    for row, baseline in zip(baseline_rows(baselines, blanks=2), baselines.values(), strict=True):
        fam = family_scores(baseline)
        rows.append(row + row[3:] + [f"{fam['edit']:.3f}", f"{fam['compose']:.3f}"])
    header = (
        ["arm", "compute", "train h"]
        + [f"{m} @64²" for m in METRIC_HEADER]
        + [f"{m} @128²" for m in METRIC_HEADER]
        + ["edits (K=1) @128²", "compositions (K≥2) @128²"]
    )
    curves("sft_curves.png", arms)
    sample_grid(samples, reports[128], FIGURES / "sft_samples.png")
    n_edit = sum(s.k == 1 for s in samples)
    units = compute_units("sft_fixed64")
    share = units / compute_units(str(ROOT / "configs" / "tiny_sft.yaml"))
    arms_flag = f" --arms {','.join(arms)}" if args.arms else ""
    text = f"""## SFT: budget schedule, task mix, training (issue 6: a, b, d)

Command: `python -m benchmarks.ablations sft --n {args.n} --jobs {args.jobs} --threads {args.threads}{arms_flag}`
(arms: `configs/ablations/sft_*.yaml`, trained from scratch, {args.jobs} at a time on the 2-core CPU,
{args.threads} thread(s) each).

Every arm spends the same compute: Σ steps × (budget/64)² = {units:.0f} optimizer steps at 64² with
batch 16 (`compute` column), {share:.3f}× the second tiny recipe's
(`configs/tiny_sft.yaml`, the default before the shipped one).
Held-out **test** split, the same {args.n} samples for every arm ({n_edit} single edits,
{args.n - n_edit} compositions with K = 2–6), evaluated with reference and target budgets 64² and
128², 20 sampler steps, EMA weights.
`train h` is training wall time (noisy: two arms shared the machine, at times with a third job).

{markdown_table(header, rows)}

![loss and validation curves](ablations/sft_curves.png)

Sample grid (test split; outputs left to right: {", ".join(models)}; then the target):

![samples](ablations/sft_samples.png)
"""
    write("sft", text)
    print(text)


def run_budgets(args: argparse.Namespace) -> None:
    """(c) The shipped model with SELF's joint budget vs diffusers' per-image budgets, K = 4–6."""
    samples = test_samples(args.n, "compose", max_refs=6, min_refs=4)
    rows, grid = baseline_rows(evaluate_baselines(samples), blanks=2), {}
    for budget in EVAL_BUDGETS:
        reports, timings = {}, {}
        for mode in (PlanMode.GLOBAL, PlanMode.PER_IMAGE):
            # Warm once, then time the full evaluation (one thread count for both modes).
            eval_model("tiny", samples[:2], budget=budget, mode=mode)
            reports[mode], timings[mode] = eval_model("tiny", samples, budget=budget, mode=mode)
        for mode, report in reports.items():
            tokens = [
                sum(sz.width * sz.height for sz in plan([Size(*r.size) for r in s.refs], budget**2, 8, mode=mode).sizes)
                // 64
                for s in samples
            ]
            rows.append(
                [f"{budget}²", mode.value, f"{sum(tokens) / len(tokens):.0f}"]
                + metric_cells(report)
                + [f"{timings[mode]:.1f}", f"{timings[mode] / timings[PlanMode.GLOBAL]:.2f}×"]
            )
            grid[f"{mode.value} @{budget}²"] = report
    header = ["budget", "reference budget", "reference tokens / sample"] + METRIC_HEADER
    header += ["eval seconds", "time vs SELF"]
    sample_grid(samples, grid, FIGURES / "budgets_samples.png")
    ks = sorted({s.k for s in samples})
    text = f"""## SELF's joint budget vs per-image budgets, K = 4–6 (issue 6: c)

Command: `python -m benchmarks.ablations budgets --n {args.n}`

The embedded default (trained with SELF, final stage at 128²) on {args.n} held-out test compositions
with K in {ks} (compose, transfer, conflict), 20 sampler steps, target at the same budget.
`global`: all references share one budget (SELF); `per_image`: each reference gets the whole budget
(diffusers' rule), so the sequence grows with K. Same samples, same seeds; times are whole
evaluations on this CPU (one process, all threads), measured {time.strftime("%Y-%m-%d")}.

{markdown_table(header, rows)}

Sample grid (outputs: {", ".join(grid)}; then the target):

![samples](ablations/budgets_samples.png)
"""
    write("budgets", text)
    print(text)
