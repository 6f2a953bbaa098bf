"""``python -m benchmarks.device_check --smoke`` runs every section of the GPU check on CPU with
shrunken transformers and writes both reports, so the unattended GPU script cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import device_check  # noqa: E402


def test_smoke_run_measures_every_case_and_writes_both_reports(tmp_path):
    report = device_check.main(["--smoke", "--out", str(tmp_path)])
    settings = device_check.Settings.smoke()
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["total_seconds"] == report["total_seconds"]
    for name, caches in (("qwen-image-edit-2511", 1), ("qwen-image-2.1", 2)):
        entry = saved[name]
        sampling, sft = entry["sampling"], entry["sft_lora"]
        assert sampling["skipped"] == [] and sft["skipped"] == []
        assert len(sampling["rows"]) == len(settings.ks) * 2 * caches
        assert [row["stage"] for row in sft["rows"]] == [f"{side}²" for side in settings.stages]
        assert all(row["seconds"] > 0 and row["step_gflops"] > 0 for row in sft["rows"])
        # SELF keeps the references' tokens at the budget whatever K is; per-image grows with K.
        by_case = {(row["k"], row["mode"]): row["ref_tokens"] for row in sampling["rows"]}
        k_max = max(settings.ks)
        assert by_case[(k_max, "global")] <= by_case[(1, "global")]
        assert by_case[(k_max, "per_image")] == k_max * by_case[(1, "per_image")]
    markdown = (tmp_path / "device_check.md").read_text()
    assert "## qwen-image-2.1" in markdown and "cache=on" in markdown


def test_guard_records_a_skip_once_the_section_is_out_of_time():
    guard = device_check.Guard("x", seconds=-1.0, deadline=float("inf"))
    guard.run("late case", lambda: {"seconds": 1.0})
    assert guard.rows == []
    assert guard.skipped == [{"case": "late case", "reason": "time guard: section budget used up"}]
