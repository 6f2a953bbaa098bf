"""SELF budget planning and packing, measured side by side.

For K = 1..10 references of mixed real aspect ratios at budgets 1024², 1536², 2048²: image tokens of
``global`` (SELF) vs ``per_image`` (diffusers) vs ``global_round`` (UniPic-3), budget use, worst
aspect error, overshoot of ``global_round``. Then the fraction of real tokens in packed batches of
mixed K, and the time of block-diagonal attention over packed rows vs one call per sample.

    python benchmarks/bench_budget.py            # writes its section of docs/benchmarks.md
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._report import markdown_table, write_section
from uniref.budget import PlanMode, Size, plan, plan_target
from uniref.sequence import attention_mask, build_sequence, pack_sequences, pack_stream

# Sizes of real photos and renders people edit: phone, DSLR, screenshots, portraits, square crops.
REAL_SIZES = [
    Size(4032, 3024),
    Size(1080, 1920),
    Size(1920, 1080),
    Size(6000, 4000),
    Size(1024, 1024),
    Size(2560, 1080),
    Size(800, 1200),
    Size(640, 480),
    Size(3024, 4032),
    Size(512, 768),
]
BUDGET_SIDES = [1024, 1536, 2048]
MULTIPLE = 32
TOKEN_PIXELS = 16
SEEDS = 20  # random mixes per (K, budget)


def budget_table() -> tuple[str, dict[str, float]]:
    rows = []
    worst = {"min_use": 1.0, "max_aspect": 0.0, "max_overshoot": 0.0}
    for side in BUDGET_SIDES:
        budget = side * side
        for k in range(1, 11):
            stats: dict[str, list[float]] = {key: [] for key in ("g", "p", "r", "use", "asp", "over")}
            for seed in range(SEEDS):
                sizes = random.Random(seed * 100 + k).choices(REAL_SIZES, k=k)
                g = plan(sizes, budget, MULTIPLE)
                p = plan(sizes, budget, MULTIPLE, PlanMode.PER_IMAGE)
                r = plan(sizes, budget, MULTIPLE, PlanMode.GLOBAL_ROUND)
                stats["g"].append(sum(g.tokens(TOKEN_PIXELS)))
                stats["p"].append(sum(p.tokens(TOKEN_PIXELS)))
                stats["r"].append(sum(r.tokens(TOKEN_PIXELS)))
                stats["use"].append(g.budget_use)
                stats["asp"].append(max(g.aspect_errors()))
                stats["over"].append(r.budget_use - 1.0)
            worst["min_use"] = min(worst["min_use"], min(stats["use"]))
            worst["max_aspect"] = max(worst["max_aspect"], max(stats["asp"]))
            worst["max_overshoot"] = max(worst["max_overshoot"], max(stats["over"]))
            rows.append(
                [
                    f"{side}²",
                    k,
                    f"{statistics.mean(stats['g']):.0f}",
                    f"{statistics.mean(stats['p']):.0f}",
                    f"{statistics.mean(stats['r']):.0f}",
                    f"{statistics.mean(stats['p']) / statistics.mean(stats['g']):.2f}×",
                    f"{min(stats['use']):.3f}",
                    f"{max(stats['asp']):.1%}",
                    f"{max(stats['over']):+.1%}",
                    sum(o > 0 for o in stats["over"]),
                ]
            )
    header = [
        "budget",
        "K",
        "global tokens",
        "per_image tokens",
        "global_round tokens",
        "per_image / global",
        "global min use",
        "global worst aspect err",
        "global_round max overshoot",
        f"global_round over budget (of {SEEDS})",
    ]
    return markdown_table(header, rows), worst


def _sample_sequences(mode: PlanMode, ks: list[int], budget_side: int, seed: int) -> list:
    """SELF sequences for a tiny-model-like geometry: 8-px tokens, identity codec of 1 channel."""
    rng = random.Random(seed)
    seqs = []
    for k in ks:
        sizes = rng.choices(REAL_SIZES, k=k)
        refs = plan(sizes, budget_side**2, 16, mode).sizes
        target = plan_target(budget_side**2, 16, like=sizes[0])
        lat = [torch.zeros(1, s.height // 4, s.width // 4) for s in [target, *refs]]
        seqs.append(build_sequence(lat[0], lat[1:]))
    return seqs


def packing_table() -> tuple[str, float]:
    rows = []
    worst_self = 1.0
    for batch in (8, 16, 32):
        for seed in range(3):
            ks = random.Random(seed).choices(range(1, 11), k=batch)
            for mode in (PlanMode.GLOBAL, PlanMode.PER_IMAGE):
                seqs = _sample_sequences(mode, ks, 128, seed)
                lengths = [s.tokens.shape[0] for s in seqs]
                packed = pack_sequences(seqs, capacity=max(lengths))
                padded = sum(lengths) / (len(lengths) * max(lengths))
                if mode is PlanMode.GLOBAL:
                    worst_self = min(worst_self, packed.real_fraction)
                rows.append(
                    [
                        batch,
                        seed,
                        mode.value,
                        f"{min(lengths)}–{max(lengths)}",
                        f"{packed.real_fraction:.3f}",
                        f"{padded:.3f}",
                    ]
                )
    header = [
        "batch",
        "seed",
        "plan",
        "tokens per sample",
        "real fraction, packed rows",
        "real fraction, pad to longest",
    ]
    return markdown_table(header, rows), worst_self


def attention_timing() -> str:
    """Block-diagonal SDPA over packed rows vs one SDPA call per sample (tiny-model width)."""
    torch.manual_seed(0)
    heads, head_dim, repeats = 4, 32, 20
    rows = []
    for batch in (8, 32):
        ks = random.Random(batch).choices(range(1, 11), k=batch)
        seqs = _sample_sequences(PlanMode.GLOBAL, ks, 128, batch)
        lengths = [s.tokens.shape[0] for s in seqs]
        xs = [torch.randn(n, heads * head_dim) for n in lengths]
        packed = pack_sequences(seqs, capacity=max(lengths))
        values = pack_stream(packed.rows, xs).values  # (R, C, D)
        mask = attention_mask(packed.sample_ids)
        q = values.view(values.shape[0], values.shape[1], heads, head_dim).transpose(1, 2)

        def run_packed(q: torch.Tensor = q, mask: torch.Tensor = mask) -> None:
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

        def run_loop(xs: list[torch.Tensor] = xs) -> None:
            for x in xs:
                y = x.view(1, -1, heads, head_dim).transpose(1, 2)
                F.scaled_dot_product_attention(y, y, y)

        timings = {}
        for name, fn in (("packed", run_packed), ("loop", run_loop)):
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            timings[name] = (time.perf_counter() - start) / repeats * 1000
        rows.append(
            [
                batch,
                len(packed.rows),
                f"{timings['packed']:.2f}",
                f"{timings['loop']:.2f}",
                f"{timings['loop'] / timings['packed']:.2f}×",
            ]
        )
    header = ["samples", "packed rows", "packed SDPA + mask (ms)", "per-sample SDPA loop (ms)", "loop / packed"]
    return markdown_table(header, rows)


def main() -> None:
    table, worst = budget_table()
    pack, worst_self = packing_table()
    attn = attention_timing()
    text = f"""## SELF budget planning (`benchmarks/bench_budget.py`)

K references drawn from {len(REAL_SIZES)} real photo/render sizes (4:3, 3:4, 16:9, 9:16, 3:2, 2:3, 1:1,
21:9), {SEEDS} random mixes per row, sides multiples of {MULTIPLE}, tokens of {TOKEN_PIXELS}² px
(Qwen-Image). `global` is SELF (hard cap), `per_image` is diffusers' QwenImageEditPlusPipeline, and
`global_round` is UniPic-3's joint rule.

Summary: `global` minimum budget use **{worst["min_use"]:.3f}**, worst aspect error
**{worst["max_aspect"]:.1%}**, never over budget; `global_round` overshoots by up to
**{worst["max_overshoot"]:+.1%}**.

{table}

### Packing batches of mixed K (tiny-model geometry: 128² budgets, 8-px tokens)

Rows are filled first-fit decreasing up to the longest sample. Worst real-token fraction with SELF:
**{worst_self:.3f}** (goal ≥ 0.95).

{pack}

### Attention over packed rows

Block-diagonal boolean mask with PyTorch SDPA over packed rows vs one SDPA call per sample
(4 heads × 32 dims, CPU, mean of 20 calls).

{attn}
"""
    write_section("bench_budget", text)
    print(text)


if __name__ == "__main__":
    main()
