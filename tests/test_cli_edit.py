import json
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli

EXAMPLES = Path(__file__).parent.parent / "examples"
REFS = [EXAMPLES / "background.png", EXAMPLES / "red_circle.png", EXAMPLES / "blue_square.png"]
INSTRUCTION = (  # the README's Quickstart
    "put the red circle from picture 2 on the left and the blue square from picture 3 on the right "
    "on the background of picture 1"
)


def _edit_args(out: Path, *extra: str) -> list[str]:
    args = ["edit", INSTRUCTION, "-o", str(out), "--model", "tiny-random", "--steps", "2", "--no-progress"]
    for ref in REFS:
        args += ["--ref", str(ref)]
    return args + list(extra)


def test_edit_json_reports_output_plan_and_timings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    code, stdout, _ = run_cli(_edit_args(out, "--json"), capsys)
    assert code == 0
    data = json.loads(stdout)
    assert set(data) == {"output", "width", "height", "plan", "seconds"}
    assert set(data["seconds"]) == {"load", "encode", "denoise", "decode", "total"}
    assert set(data["plan"]) == {"mode", "budget_pixels", "multiple", "images", "total_tokens", "token_cap"}
    assert [Path(i["path"]) for i in data["plan"]["images"]] == REFS
    assert data["plan"]["total_tokens"] <= data["plan"]["token_cap"]
    with Image.open(out) as img:
        assert img.size == (data["width"], data["height"])
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # atomic: no temp file left


def test_edit_is_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert run_cli(_edit_args(a, "--seed", "3"), capsys)[0] == 0
    assert run_cli(_edit_args(b, "--seed", "3"), capsys)[0] == 0
    assert run_cli(_edit_args(c, "--seed", "4"), capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_edit_size_and_budget_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.png"
    code, stdout, _ = run_cli(_edit_args(out, "--size", "100x60", "--budget", "48", "--json"), capsys)
    assert code == 0
    data = json.loads(stdout)
    assert (data["width"], data["height"]) == (96, 56)
    assert data["plan"]["budget_pixels"] == 48 * 48


def test_edit_size_like_takes_that_references_aspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {}
    for n in (1, 2):
        code, stdout, _ = run_cli(_edit_args(tmp_path / f"{n}.png", "--size-like", str(n), "--json"), capsys)
        assert code == 0
        data = json.loads(stdout)
        sizes[n] = (data["width"], data["height"])
    for n, (w, h) in sizes.items():
        with Image.open(REFS[n - 1]) as ref:
            assert abs(w / h - ref.width / ref.height) < 0.25 * ref.width / ref.height
    assert sizes[1][0] > sizes[1][1] and sizes[2][0] == sizes[2][1]  # 320x192 -> wide; 128x128 -> square


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--size", "big"], "--size 'big'"),
        (["--ref", "nope.png"], "nope.png: no such file"),
        (["--model", "no/such/model"], "no such folder"),
        (["--budget", "8"], "cannot fit"),
        (["--size-like", "4"], "--size-like 4: there are 3 references"),
        (["--size-like", "1", "--size", "64x64"], "not both"),
        (["--dtype", "fp64"], "--dtype 'fp64': choose one of auto, fp32, bf16, fp16"),
    ],
)
def test_edit_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    code, _, err = run_cli(_edit_args(tmp_path / "x.png", *extra), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_edit_rejects_unknown_output_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(_edit_args(tmp_path / "x.unknown"), capsys)
    assert code == 2 and "unknown image format" in err


def test_edit_dtype_defaults_to_auto_which_is_fp32_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniref.pipeline import EditPipeline

    loaded = []
    real = EditPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        pipe = real(cls, *args, **kwargs)
        loaded.append((kwargs["dtype"], pipe.model.dtype))
        return pipe

    monkeypatch.setattr(EditPipeline, "from_pretrained", classmethod(spy))
    assert run_cli(_edit_args(tmp_path / "a.png"), capsys)[0] == 0
    assert run_cli(_edit_args(tmp_path / "b.png", "--dtype", "fp32"), capsys)[0] == 0
    import torch

    assert loaded == [("auto", torch.float32), ("fp32", torch.float32)]
