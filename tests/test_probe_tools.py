from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks.grow_tiny import deepen, main

from uniref.data import TaskConfig, generate, parse_tasks
from uniref.models.tiny import TinyConfig, build_tiny, load_tiny_folder
from uniref.train.batch import make_batch

SMALL = TinyConfig(width=32, depth=3, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0)


def _x0(model, samples) -> torch.Tensor:
    batch = make_batch(model, samples, 48 * 48, 48 * 48, list(range(len(samples))))
    cond = model.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)
    with torch.no_grad():
        return model.predict_x0(batch.packed, cond, batch.sigma)


def _open_gates(model):
    """A trained model's gates are not zero (a fresh model's adaLN-zero would hide errors): give the
    blocks and the output modulation some."""
    with torch.no_grad():
        for block in model.net.blocks:
            for stream in (block.img, block.txt):
                stream.modulation.bias.normal_(0, 0.3)
        model.net.out_mod.bias.normal_(0, 0.3)
    return model


def test_a_deepened_model_computes_what_the_trained_one_did_and_its_new_blocks_learn(tmp_path: Path) -> None:
    model = _open_gates(build_tiny(SMALL, seed=1))
    samples = [generate(i, TaskConfig(parse_tasks("add,compose"), 3)) for i in range(4)]
    deep = deepen(model, 5)
    assert deep.config.depth == 5 and len(deep.net.blocks) == 5
    torch.testing.assert_close(_x0(deep, samples), _x0(model, samples), rtol=1e-5, atol=1e-6)
    # The new blocks are not dead: their zero modulation gets a gradient.
    batch = make_batch(deep, samples, 48 * 48, 48 * 48, list(range(4)))
    cond = deep.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)
    deep.net.train()
    deep.predict_x0(batch.packed, cond, batch.sigma).square().mean().backward()
    assert deep.net.blocks[3].img.modulation.weight.grad.abs().sum() > 0
    main([str(model.save(tmp_path / "m")), "--depth", "4", "-o", str(tmp_path / "deep")])
    assert load_tiny_folder(tmp_path / "deep").config.depth == 4
    with pytest.raises(ValueError, match="already has 3 blocks"):
        deepen(model, 2)


def test_x0_trace_draws_one_row_per_composition_with_each_guess(tmp_path: Path, capsys) -> None:
    from benchmarks import x0_trace
    from PIL import Image

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    out = tmp_path / "trace.png"
    x0_trace.main([str(folder), "--out", str(out), "--n", "2", "--budget", "48", "--at", "0,10"])
    assert f"wrote {out}" in capsys.readouterr().out
    sheet = Image.open(out)
    assert sheet.width > 4 * 48 and sheet.height > 0


def test_x0_trace_guesses_end_where_the_sampler_does(tmp_path: Path) -> None:
    from benchmarks.x0_trace import trace

    from uniref.budget import Size
    from uniref.pipeline import EditPipeline

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    pipe = EditPipeline.from_pretrained(str(folder))
    s = generate(0, TaskConfig(parse_tasks("compose"), 2))
    guesses, sigmas, output = trace(pipe, s.instruction, list(s.refs), Size(*s.target.size), 48, [0, 19])
    assert len(guesses) == 2 and sigmas[0] == 1.0 > sigmas[1]
    # The traced loop is the pipeline's sampler: same output as a plain call, seed 0.
    like = Size(*s.target.size)
    plain = pipe.generate(s.instruction, list(s.refs), seed=0, budget=48, target_budget=48, target_like=like).images[0]
    assert output.size == plain.size
    assert np.abs(np.asarray(output, np.int16) - np.asarray(plain, np.int16)).max() <= 1


def test_model_card_on_val_writes_its_tables_and_figures_where_told(tmp_path: Path) -> None:
    import json

    from benchmarks import model_card

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "time": 10.0 * s, "loss": 1.0 / s, "stage": 0, "budget": 48} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "card"
    model_card.main(
        ["--run", str(run), "--model", str(folder), "--compare", "--n", "2", "--split", "val", "--out", str(out)]
    )
    text = (out / "tiny_eval.md").read_text()
    assert "**Validation** split" in text and "--split val" in text
    assert "| val samples | n | overall | goal |" in text and "test samples" not in text
    assert "baseline: copy_first" in text and "0.01 h" in text  # 4 gaps of 10 s
    assert (out / "tiny_loss.png").stat().st_size > 0 and (out / "tiny_samples.png").stat().st_size > 0


def test_detail_loss_starts_the_sampler_from_the_truth_renoised_to_the_first_sigma_below_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import detail_loss

    from uniref.budget import Size
    from uniref.images import resize, to_tensor
    from uniref.pipeline import EditPipeline
    from uniref.sequence import patchify

    folder = build_tiny(SMALL, seed=4).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    pipe = EditPipeline.from_pretrained(str(folder))
    sample = generate(7, TaskConfig(parse_tasks("compose"), 2))
    like = Size(*sample.target.size)
    plain = pipe.prepare(sample.instruction, list(sample.refs), budget=48, target_budget=48, target_like=like, seed=3)
    seen = {}
    denoise = pipe.denoise

    def spy(prep, **kw):
        seen["schedule"] = prep.schedules[0].clone()
        seen["start"] = prep.sequences[0].tokens[: prep.sequences[0].num_target_tokens].clone()
        return denoise(prep, **kw)

    monkeypatch.setattr(pipe, "denoise", spy)
    image = detail_loss.start_from_truth(pipe, sample, 48, 0.5, seed=3)
    full = plain.schedules[0]
    first = int(torch.nonzero(full <= 0.5)[0])
    torch.testing.assert_close(seen["schedule"], full[first:])  # the default schedule's tail, down to 0
    seq = plain.sequences[0]
    rows, cols = seq.grids[0]
    side = pipe.model.spec.token_pixels
    truth = pipe.model.encode_images([to_tensor(resize(sample.target, Size(cols * side, rows * side)))])[0]
    sigma = full[first]
    noise = seq.tokens[: seq.num_target_tokens]  # the request's own noise
    torch.testing.assert_close(seen["start"], (1 - sigma) * patchify(truth, seq.patch) + sigma * noise)
    assert image.size == (cols * side, rows * side)
    # σ₀ = 0 is the codec's round trip: no sampler step at all.
    seen.clear()
    assert detail_loss.start_from_truth(pipe, sample, 48, 0.0).size == image.size and not seen
    row = detail_loss.score_row([sample], [image])
    assert set(row) == {"overall", "worst ref", "instruction", *detail_loss.PARTS, "background"}
    assert all(0.0 <= v <= 1.0 for v in row.values())


def test_a_widened_model_computes_what_the_trained_one_did_and_its_copies_can_part(tmp_path: Path) -> None:
    from benchmarks.grow_tiny import widen

    model = _open_gates(build_tiny(SMALL, seed=2))
    samples = [generate(i, TaskConfig(parse_tasks("add,compose"), 3)) for i in range(4)]
    wide = widen(model, 64, noise=0.0)
    assert (wide.config.width, wide.config.heads) == (64, 4)
    torch.testing.assert_close(_x0(wide, samples), _x0(model, samples), rtol=1e-4, atol=1e-5)
    # With the symmetry-breaking noise the function moves a little, and the two copies of a weight differ.
    noisy = widen(model, 64)
    assert (_x0(noisy, samples) - _x0(model, samples)).abs().max() < 0.05
    w = noisy.net.blocks[0].img.mlp[0].weight
    assert not torch.equal(w[:, :32], w[:, 32:])
    main([str(model.save(tmp_path / "m")), "--width", "64", "-o", str(tmp_path / "wide")])
    assert load_tiny_folder(tmp_path / "wide").config.width == 64
    with pytest.raises(ValueError, match="only doubling"):
        widen(model, 48)


def test_noise_level_table_has_a_row_per_level_and_paired_deltas_against_the_first(tmp_path: Path, capsys) -> None:
    from benchmarks import noise_level

    folder = build_tiny(SMALL, seed=5).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    noise_level.main([str(folder), "--levels", "0,0.7", "--n", "3", "--max-refs", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| noise level | compositions K = 2–4 (n = 3) | edits (K = 1) (n = 3) |")
    assert lines[1].startswith("| 0 | ") and "Δ" not in lines[1]
    assert lines[2].startswith("| 0.7 | ") and lines[2].count("Δ") == 2
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        f"| *baseline: {name}*" for name in ("copy_first", "copy_last", "grey", "other_target")
    ]


def test_train_speed_times_each_width_and_gives_ratios_to_the_first(capsys) -> None:
    from benchmarks import train_speed

    train_speed.main(["--widths", "32,64", "--steps", "6", "--warmup", "2", "--budget", "48", "--batch", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "width" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["32", "64"]
    assert float(rows[0].split("|")[5]) == 1.0 and float(rows[1].split("|")[4]) > 0


def test_quickstart_variants_ask_the_same_scene_in_known_words_with_every_picture_named() -> None:
    import re

    from benchmarks.quickstart_figure import EXAMPLES, INSTRUCTION, VARIANTS

    from uniref.data.vocab import unknown_words

    assert VARIANTS[0] == (INSTRUCTION, EXAMPLES)
    for instruction, names in VARIANTS:
        assert unknown_words(instruction) == [], instruction
        named = {int(n) for n in re.findall(r"picture (\d+)", instruction)}
        assert named == set(range(1, len(names) + 1)), instruction
        # Each object is asked from the picture that shows it.
        for colour, example in (("red circle", "red_circle"), ("blue square", "blue_square")):
            if (found := re.search(rf"{colour} from picture (\d+)", instruction)) is not None:
                assert names[int(found.group(1)) - 1] == example, instruction
