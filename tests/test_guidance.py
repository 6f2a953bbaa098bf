"""Instruction dropout in training and the tiny model's own CFG scale (issue 17's CFG probe)."""

from pathlib import Path

import torch

from uniref.data import TaskConfig, generate, parse_tasks
from uniref.models.base import DEFAULT_NEGATIVE
from uniref.models.tiny import TinyConfig, build_tiny, load_tiny_folder
from uniref.train.batch import make_batch

SMALL = TinyConfig(width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0)


def _batch(p: float):
    model = build_tiny(SMALL)
    samples = [generate(i, TaskConfig(parse_tasks("add,compose"), 2)) for i in range(16)]
    return samples, make_batch(model, samples, 48 * 48, 48 * 48, list(range(16)), instruction_dropout=p)


def test_instruction_dropout_swaps_some_instructions_for_the_negative_and_keeps_the_noise() -> None:
    samples, plain = _batch(0.0)
    _, dropped = _batch(0.5)
    _, again = _batch(0.5)
    assert plain.instructions == [s.instruction for s in samples]
    swapped = [d == DEFAULT_NEGATIVE for d in dropped.instructions]
    assert 0 < sum(swapped) < len(samples)
    kept = [d for d, s in zip(dropped.instructions, swapped, strict=True) if not s]
    assert kept == [s.instruction for s, w in zip(samples, swapped, strict=True) if not w]
    # The drop is drawn after σ and ε from the sample's own generator: the noised batch is unchanged,
    # and the same seeds drop the same samples (so a resumed run drops what the first run would have).
    assert torch.equal(plain.sigma, dropped.sigma)
    assert torch.equal(plain.packed.tokens.values, dropped.packed.tokens.values)
    assert again.instructions == dropped.instructions


def test_a_tiny_models_guidance_is_its_pipeline_default_and_survives_saving(tmp_path: Path) -> None:
    assert build_tiny(SMALL).default_guidance == 1.0
    model = build_tiny(TinyConfig(**{**SMALL.__dict__, "guidance": 3.0}))
    assert model.default_guidance == 3.0
    model.save(tmp_path / "m")
    assert load_tiny_folder(tmp_path / "m").default_guidance == 3.0


def test_routing_diagnostics_samples_each_model_at_each_guidance(tmp_path: Path, capsys) -> None:
    from benchmarks import routing_diagnostics

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    routing_diagnostics.main([str(folder), "--n", "2", "--budget", "48", "--max-refs", "2", "--guidance", "1,2.5"])
    out = capsys.readouterr().out
    blocks = out.split(f"{folder} guidance ")[1:]
    assert [b.split()[0] for b in blocks] == ["1", "2.5"]
    assert all("placed objects: iou" in b for b in blocks)


def test_export_stores_the_chosen_guidance_and_refuses_it_without_dropout(tmp_path: Path, capsys) -> None:
    from cli_helpers import run_cli
    from test_sft import _config
    from uniref.train.sft import train_sft

    for name, p in (("dropped", "0.2"), ("plain", "0")):
        config = _config(tmp_path / name, "train.max_steps=2", f"loss.instruction_dropout={p}")
        train_sft(config)
    export = ["train", "export"]
    code, _, _ = run_cli([*export, str(tmp_path / "dropped"), "-o", str(tmp_path / "m"), "--guidance", "2.5"], capsys)
    assert code == 0 and load_tiny_folder(tmp_path / "m").default_guidance == 2.5
    code, _, err = run_cli([*export, str(tmp_path / "plain"), "-o", str(tmp_path / "n"), "--guidance", "2"], capsys)
    assert code == 2 and "instruction_dropout" in err and err.count("\n") == 1
    assert not (tmp_path / "n").exists()
    code, _, _ = run_cli([*export, str(tmp_path / "plain"), "-o", str(tmp_path / "n")], capsys)
    assert code == 0 and load_tiny_folder(tmp_path / "n").default_guidance == 1.0


def test_export_of_a_run_whose_config_has_an_unknown_key_says_so_in_one_line(tmp_path: Path, capsys) -> None:
    from cli_helpers import run_cli
    from test_sft import _config
    from uniref.train.sft import train_sft

    train_sft(_config(tmp_path / "run", "train.max_steps=1"))
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("optim:\n", "optim:\n  not_a_key: 1\n", 1))
    code, _, err = run_cli(["train", "export", str(tmp_path / "run"), "-o", str(tmp_path / "m")], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown key 'optim.not_a_key'" in err
    assert not (tmp_path / "m").exists()
