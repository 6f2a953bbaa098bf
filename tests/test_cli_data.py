import json

from typer.testing import CliRunner

from uniref.cli import _register, app
from uniref.data.splits import SPLIT_SPAN, split_samples, split_seed

_register()
runner = CliRunner()


def _rows(path):
    return [json.loads(line) for line in (path / "manifest.jsonl").read_text().splitlines()]


def test_make_check_show_round_trip(tmp_path):
    out = tmp_path / "ds"
    r = runner.invoke(app, ["data", "make", "--out", str(out), "--n", "6", "--max-refs", "3", "--size-range", "32:64"])
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 6
    r = runner.invoke(app, ["data", "check", str(out)])
    assert r.exit_code == 0 and "6 good rows of 6" in r.output
    r = runner.invoke(app, ["data", "show", str(out), "-o", str(tmp_path / "sheet.png")])
    assert r.exit_code == 0 and (tmp_path / "sheet.png").stat().st_size > 0


def test_check_exits_1_and_names_every_bad_row(tmp_path):
    out = tmp_path / "ds"
    runner.invoke(app, ["data", "make", "--out", str(out), "--n", "3", "--tasks", "edit"])
    (out / _rows(out)[1]["output_image"]).unlink()
    r = runner.invoke(app, ["data", "check", str(out)])
    assert r.exit_code == 1
    assert "row 2" in r.output and "_target.png" in r.output


def test_splits_draw_from_disjoint_seed_ranges(tmp_path):
    seeds = {}
    for split in ("train", "test"):
        out = tmp_path / split
        r = runner.invoke(app, ["data", "make", "--out", str(out), "--n", "5", "--split", split])
        assert r.exit_code == 0, r.output
        seeds[split] = {row["spec"]["seed"] for row in _rows(out)}
    assert not seeds["train"] & seeds["test"]
    # Whatever --seed a user picks, a split's seeds stay inside its own range.
    assert split_seed("train", SPLIT_SPAN - 1, 0) < split_seed("val", 0, 0) < split_seed("test", 0, 0)


def test_bad_options_fail_with_one_line_and_exit_2(tmp_path):
    from uniref.cli import main

    for args in (["--tasks", "explode"], ["--split", "dev"], ["--size-range", "big"], ["--seed", str(SPLIT_SPAN)]):
        try:
            main(["data", "make", "--out", str(tmp_path / "x"), "--n", "2", *args])
        except SystemExit as exc:
            assert exc.code == 2, args
        else:
            raise AssertionError(f"{args} did not fail")


def test_split_samples_are_the_samples_data_make_writes(tmp_path):
    out = tmp_path / "val"
    r = runner.invoke(app, ["data", "make", "--out", str(out), "--n", "3", "--split", "val", "--seed", "7"])
    assert r.exit_code == 0, r.output
    samples = split_samples("val", 3, seed=7)
    assert [s.spec["seed"] for s in samples] == [row["spec"]["seed"] for row in _rows(out)]
    assert [s.instruction for s in samples] == [row["instruction"] for row in _rows(out)]
