import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from uniref.explain import summarise_attention, write_explanation
from uniref.models.tiny import TinyConfig, build_tiny
from uniref.sequence import build_sequence, pack_sequences

EXAMPLES = Path(__file__).parent.parent / "examples"
REFS = [EXAMPLES / "background.png", EXAMPLES / "red_circle.png", EXAMPLES / "blue_square.png"]
WORDS = ("put", "the", "red", "circle", "from", "picture", "on", "background", "of", "1", "2", "3")


@pytest.mark.parametrize("binding", [0, 16 * 16], ids=["words", "binding"])
def test_recorded_attention_masses_of_each_output_token_sum_to_one_and_follow_the_packing(binding: int) -> None:
    config = TinyConfig(vocabulary=WORDS, width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1,
                        mlp_ratio=2, binding_budget=binding)  # fmt: skip
    model = build_tiny(config, seed=1)
    torch.manual_seed(0)
    for p in model.net.parameters():
        p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    grids = [[(2, 3), (2, 2), (1, 2)], [(3, 2), (2, 1)]]
    seqs = [
        build_sequence(*(lambda lat: (lat[0], lat[1:]))([torch.randn(48, 2 * h, 2 * w, generator=g) for h, w in gr]))
        for gr in grids
    ]  # noqa: E501
    refs = [[Image.new("RGB", (16, 16), c) for c in ("red", "blue")], [Image.new("RGB", (16, 16), "green")]]
    cond = model.encode_condition(["put the red circle from picture 2", "the background of picture 1"], refs, [[], []])
    batch = pack_sequences(seqs, capacity=128, extra_lengths=[t.shape[0] for t in cond.txt])
    with torch.no_grad(), model.record_attention() as log:
        model.velocity(batch, cond, torch.tensor([0.4, 0.7]))
        model.velocity(batch, cond, torch.tensor([0.2, 0.3]))
    assert log.calls == {0: 2, 1: 2} and log.grids == {0: (2, 3), 1: (3, 2)}
    for j, k in ((0, 2), (1, 1)):
        masses = log.mean(j)
        assert masses.shape == (2, grids[j][0][0] * grids[j][0][1], 2 + k)
        torch.testing.assert_close(masses.sum(-1), torch.ones(masses.shape[:2]))  # self + text + refs = all
    assert all(b.record is None for b in model.net.blocks)  # recording stops with the block
    summary = summarise_attention(log.mean(0))
    assert sum(r["share"] for r in summary["references"]) == pytest.approx(1.0)
    assert len(summary["references"][0]["mass_per_layer"]) == 2


def test_write_explanation_puts_heat_maps_json_and_one_line_in_the_folder(tmp_path: Path) -> None:
    masses = torch.zeros(3, 6, 4)
    masses[..., 0], masses[..., 1], masses[..., 2], masses[..., 3] = 0.5, 0.1, 0.3, 0.1
    line = write_explanation(tmp_path, Image.new("RGB", (24, 16), "grey"), masses, (2, 3))
    assert line.startswith("picture 1 got 75 %, picture 2 got 25 % of the attention")
    assert {p.name for p in tmp_path.iterdir()} == {"attention.json", "explain.png", "picture_1.png", "picture_2.png"}
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["summary"] == line and data["references"][1]["mass"] == pytest.approx(0.1)


def test_edit_explain_writes_the_folder_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    instruction = "put the red circle from picture 2 on the background of picture 1"
    args = ["edit", instruction, "-o", str(tmp_path / "o.png"), "--model", "tiny-random", "--steps", "2"]
    args += ["--no-progress", "--explain", str(tmp_path / "why"), "--json"]
    for ref in REFS:
        args += ["--ref", str(ref)]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    data = json.loads(stdout)
    assert data["explain"]["folder"] == str(tmp_path / "why") and "picture 3 got" in data["explain"]["summary"]
    assert (tmp_path / "why" / "picture_3.png").exists()
