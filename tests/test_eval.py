import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from uniref.cli import _register, app
from uniref.data.splits import split_samples
from uniref.data.tasks import SizeRange, TaskConfig
from uniref.eval import METRICS, evaluate, worst_case_grid
from uniref.pipeline import EditPipeline

_register()
runner = CliRunner()
SMALL = TaskConfig(max_refs=3, size_range=SizeRange(32, 64))


@pytest.fixture(scope="module")
def samples():
    return split_samples("val", 5, SMALL)


@dataclass
class _Result:
    images: list[Image.Image]


class _OraclePipe:
    """A perfect "model": returns each request's ground-truth target (found by its reference list)."""

    def __init__(self, samples, blank: bool = False) -> None:
        self.targets = {id(s.refs[0]): s.target for s in samples}
        self.blank = blank
        self.calls = 0

    def generate(self, instructions, refs, size=None, *, target_like, **kwargs):
        self.calls += 1
        out = []
        for r, size in zip(refs, target_like, strict=True):
            img = Image.new("RGB", (size.width, size.height), (128, 128, 128)) if self.blank else self.targets[id(r[0])]
            out.append(img)
        return _Result(out)


def test_report_breaks_down_by_task_and_k_consistently_with_its_records(samples):
    pipe = EditPipeline.from_pretrained("tiny-random")
    report = evaluate(pipe, samples, steps=2, batch_size=3, progress=False)
    assert report.n == len(report.records) == len(samples)
    assert [r.index for r in report.records] == list(range(len(samples)))
    assert sum(m["n"] for m in report.by_task.values()) == sum(m["n"] for m in report.by_k.values()) == report.n
    for k, m in report.by_k.items():
        recs = [r for r in report.records if r.k == k]
        assert m["n"] == len(recs)
        assert m["ref_consistency"] == pytest.approx(np.mean([r.score.ref_consistency for r in recs]))
        assert m["worst_ref_consistency"] == pytest.approx(np.mean([r.score.worst_ref for r in recs]))
    for task, m in report.by_task.items():
        recs = [r for r in report.records if r.task == task]
        assert m["instruction_accuracy"] == pytest.approx(np.mean([r.score.instruction for r in recs]))
    assert report.worst_ref_consistency <= report.ref_consistency
    assert all(0.0 <= getattr(report, m) <= 1.0 for m in METRICS)
    json.dumps(report.to_json())  # strict JSON (no inf) round-trips


def test_perfect_model_scores_one_and_blank_model_scores_low(samples):
    perfect = evaluate(_OraclePipe(samples), samples, progress=False)
    assert perfect.worst_ref_consistency > 0.999 and perfect.instruction_accuracy == 1.0 and perfect.quality > 0.999
    blank = evaluate(_OraclePipe(samples, blank=True), samples, progress=False)
    assert blank.ref_consistency < 0.5 and blank.worst_ref_consistency < 0.3


def test_batch_size_only_changes_how_many_calls_are_made(samples):
    one, many = _OraclePipe(samples), _OraclePipe(samples)
    a = evaluate(one, samples, batch_size=1, progress=False)
    b = evaluate(many, samples, batch_size=4, progress=False)
    assert (one.calls, many.calls) == (5, 2)
    assert a.to_json() == b.to_json()


def test_worst_case_grid_draws_one_row_per_worst_sample(samples):
    report = evaluate(_OraclePipe(samples, blank=True), samples, progress=False, keep_outputs=True)
    grid = worst_case_grid(report, samples, n=3)
    one = worst_case_grid(report, samples, n=1)
    assert grid.height > 2 * one.height
    with pytest.raises(ValueError, match="keep_outputs"):
        worst_case_grid(evaluate(_OraclePipe(samples), samples, progress=False), samples)


def _make(tmp_path, n=4):
    out = tmp_path / "ds"
    r = runner.invoke(
        app, ["data", "make", "--out", str(out), "--n", str(n), "--max-refs", "3", "--size-range", "32:48"]
    )
    assert r.exit_code == 0, r.output
    return out


def _eval(ds, rep, *extra):
    args = ["eval", "--data", str(ds), "--model", "tiny-random", "--out", str(rep), "--steps", "2", "--json"]
    return runner.invoke(app, [*args, "--no-progress", *extra])


def test_eval_json_prints_one_object_and_writes_the_report(tmp_path):
    ds = _make(tmp_path)
    rep = tmp_path / "rep"
    r = _eval(ds, rep)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    for key in (*METRICS, "overall", "by_task", "by_k"):
        assert key in summary
    for group in (summary["by_task"], summary["by_k"]):
        assert all(set(m) == {*METRICS, "overall", "n"} for m in group.values())
    assert "baselines" not in summary
    assert summary["n"] == 4 and summary["rows"] == {"read": 4, "bad": 0, "evaluated": 4}
    assert len(json.loads((rep / "report.json").read_text())["samples"]) == 4
    assert "## By task" in (rep / "report.md").read_text()
    assert Image.open(rep / "worst.png").width > 0


def test_eval_counts_and_names_bad_rows(tmp_path):
    ds = _make(tmp_path)
    lines = (ds / "manifest.jsonl").read_text().splitlines()
    (ds / json.loads(lines[1])["output_image"]).unlink()
    (ds / "manifest.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n")
    r = _eval(ds, tmp_path / "rep", "--n", "10")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["rows"] == {"read": 5, "bad": 2, "evaluated": 3}
    assert len(summary["problems"]) == 2 and "row 2" in r.stderr and "row 5" in r.stderr


def test_eval_of_a_missing_dataset_is_a_one_line_error(tmp_path):
    from uniref.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "rep")])
    assert exc.value.code == 2


def test_eval_baselines_flag_adds_every_trivial_output_to_json_and_report(tmp_path):
    ds = _make(tmp_path)
    rep = tmp_path / "rep"
    r = _eval(ds, rep, "--baselines")
    assert r.exit_code == 0, r.output
    baselines = json.loads(r.stdout)["baselines"]
    assert set(baselines) == {"copy_first", "copy_last", "grey", "other_target"}
    for scores in baselines.values():
        assert {"overall", *METRICS} <= set(scores)
        assert all(0.0 <= scores[m] <= 1.0 for m in ("overall", *METRICS))
    assert "baseline: copy_first" in (rep / "report.md").read_text()


def test_a_long_instruction_makes_its_sheet_row_taller_instead_of_overflowing() -> None:
    from PIL import Image

    from uniref.viz import SHEET_THUMB, SheetRow, draw_sheet

    img = Image.new("RGB", (32, 32), "grey")
    short = draw_sheet([SheetRow([img], [img], "make it red"), SheetRow([img], [img], "x")])
    long = draw_sheet(
        [SheetRow([img], [img], "put the circle from picture 2 at the top " * 12), SheetRow([img], [img], "x")]
    )
    assert short.height == 2 * SHEET_THUMB + 3 * 6
    assert long.height > short.height + SHEET_THUMB // 2
