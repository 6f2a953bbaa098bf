import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import run_cli

EXAMPLES = Path(__file__).parent.parent / "examples"


def _images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, size in enumerate([(640, 480), (300, 900), (1000, 1000)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (i * 80, 100, 50)).save(p)
        paths.append(p)
    return paths


def test_plan_json_has_exact_keys_and_respects_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path)
    code, out, _ = run_cli(["plan", "--budget", "1024", *map(str, paths), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"mode", "budget_pixels", "multiple", "images", "total_tokens", "token_cap"}
    assert data["mode"] == "global" and data["budget_pixels"] == 1024**2 and data["multiple"] == 32
    assert set(data["images"][0]) == {"path", "width", "height", "planned_width", "planned_height", "tokens"}
    assert [(i["width"], i["height"]) for i in data["images"]] == [(640, 480), (300, 900), (1000, 1000)]
    assert data["total_tokens"] == sum(i["tokens"] for i in data["images"]) <= data["token_cap"] == 4096


def test_plan_json_reports_exif_oriented_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "r.jpg"
    Image.new("RGB", (400, 100)).save(path, exif=exif)
    _, out, _ = run_cli(["plan", str(path), "--json"], capsys)
    item = json.loads(out)["images"][0]
    assert (item["width"], item["height"]) == (100, 400)


def test_per_image_mode_spends_a_budget_per_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path)
    _, out, _ = run_cli(["plan", *map(str, paths), "--mode", "per_image", "--json"], capsys)
    data = json.loads(out)
    assert data["total_tokens"] > 2.5 * data["token_cap"]


def test_plan_human_output_is_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    examples = sorted(EXAMPLES.glob("*.png"))
    code, out, _ = run_cli(["plan", "--budget", "1024", *map(str, examples)], capsys)
    assert code == 0 and "budget use" in out and "planned" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["plan", "missing.png"], "missing.png: no such file"),
        (["plan", "--budget", "32", "A", "A", "A"], "cannot fit"),
        (["plan", "--budget", "lots", "A"], "budget 'lots'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    img = _images(tmp_path)[0]
    args = [str(img) if a == "A" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    proc = subprocess.run(
        [sys.executable, "-c", "from uniref.cli import main; main()", "plan", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: not an image PIL can read"
