"""The Qwen-Image-2.1 mid-size benchmark (benchmarks/bench_model_21.py) runs end to end
at its smoke settings, and its FLOP count is the closed form it documents (the benchmark itself takes
far longer and is run for the record on a quiet machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_model_21 as bench  # noqa: E402
from benchmarks._report import DOC  # noqa: E402

from uniref.budget import PlanMode  # noqa: E402


@pytest.fixture(scope="module")
def smoke() -> dict:
    return bench.bench_mid21(bench.SMOKE21)


def test_smoke_run_times_every_arm_and_self_keeps_reference_tokens_under_the_budget(smoke) -> None:
    s = bench.SMOKE21
    assert all(len(runs) == s.forward_repeats and min(runs) > 0 for runs in smoke["forward"].values())
    assert len(smoke["forward"]) == len(s.ks) * 4 and len(smoke["e2e"]) == len(s.ks) * 4
    target = (s.side // bench.VAE21_SCALE) ** 2
    budget_tokens = (s.side // bench.VAE21_SCALE) ** 2
    for k in s.ks:
        g = smoke["cases"][bench.key(k, PlanMode.GLOBAL.value)]
        p = smoke["cases"][bench.key(k, PlanMode.PER_IMAGE.value)]
        assert g["target"] == p["target"] == target
        assert g["img"] - target <= budget_tokens  # SELF: all references under one budget
        assert p["img"] - target > budget_tokens or k == 1  # per_image: one budget each
        # The condition segments hold every text token and every reference token.
        assert sum(g["segments"]) == g["txt"] + g["img"] - target


def test_section_has_a_row_per_k_and_smoke_writes_no_docs(smoke, monkeypatch) -> None:
    text = bench.mid21_section(bench.SMOKE21, smoke)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * len(bench.SMOKE21.ks)  # forward table and end-to-end table
    monkeypatch.setattr(bench, "bench_mid21", lambda settings: smoke)
    before = DOC.read_text()
    assert bench.main21(["--smoke"]) == text
    assert DOC.read_text() == before


def test_transformer21_flops_is_the_closed_form() -> None:
    # 1 layer, width 2, segments [2 text, 4 ref] and 3 target tokens; 2·(4 + 3·3)·d² = 104 per token.
    full = 104 * 9 + 4 * 2 * (2 * 2 + 4 * 6 + 3 * 9)
    cached = 104 * 3 + 4 * 2 * (3 * 9)
    assert bench.transformer21_flops([2, 4], 3, layers=1, width=2, cached=False) == full
    assert bench.transformer21_flops([2, 4], 3, layers=1, width=2, cached=True) == cached
    assert bench.transformer21_flops([2, 4], 3, layers=3, width=2, cached=True) == 3 * cached


def test_condition_segments_turn_reference_slots_into_latent_tokens() -> None:
    import torch

    flags = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert bench.condition_segments(flags) == [2, 8, 1, 4, 3]
