from pathlib import Path

import pytest

from uniref.config import TrainingConfig, load_config, parse_overrides, read_yaml, save_config
from uniref.errors import ConfigError


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    assert parse_overrides(["train.max_steps=7", "run.output_dir=out/x", "a.b.c=[1, 2]", "flag=true"]) == {
        "train": {"max_steps": 7},
        "run": {"output_dir": "out/x"},
        "a": {"b": {"c": [1, 2]}},
        "flag": True,
    }


def test_every_training_config_accepts_max_steps_and_output_dir(tmp_path: Path) -> None:
    cfg = load_config(TrainingConfig, overrides=["train.max_steps=5", f"run.output_dir={tmp_path}"])
    assert cfg.train.max_steps == 5 and cfg.run.output_dir == tmp_path


def test_yaml_file_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 100\nrun:\n  seed: 3\n")
    cfg = load_config(TrainingConfig, path, ["train.max_steps=9"])
    assert cfg.train.max_steps == 9 and cfg.run.seed == 3


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'train.max_stepz'"):
        load_config(TrainingConfig, overrides=["train.max_stepz=5"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'trian'"):
        load_config(TrainingConfig, path)


def test_wrong_type_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(TrainingConfig, overrides=["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(TrainingConfig, overrides=["train.max_steps=-1"])


def test_malformed_override_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(bad)


def test_resolved_config_is_saved_and_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config(TrainingConfig, overrides=["train.max_steps=42", "run.seed=7"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(TrainingConfig, path) == cfg


def test_shipped_sft_configs_validate_and_take_the_common_overrides(tmp_path: Path) -> None:
    from uniref.train.config import SFTConfig

    paths = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*sft*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(SFTConfig, path, ["train.max_steps=3", f"run.output_dir={tmp_path}"])
        assert cfg.train.max_steps == 3 and cfg.run.output_dir == tmp_path
        budgets = [s.budget for s in cfg.stages]
        # Progressive: budgets never shrink and grow at least once (the real model's 1024² -> 1536² ->
        # 2048²; tiny recipes may skip a level, as configs/tiny_sft_next.yaml goes 64² -> 128²).
        assert budgets == sorted(budgets) and len(set(budgets)) >= 2


def test_shipped_rl_configs_validate_and_take_the_common_overrides(tmp_path: Path) -> None:
    from uniref.train.config import RLConfig

    paths = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*msgrpo*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(RLConfig, path, ["train.max_steps=3", f"run.output_dir={tmp_path}"])
        assert cfg.train.max_steps == 3 and cfg.rl.window < cfg.rl.sample_steps


def test_every_config_in_the_repo_validates_and_takes_the_common_overrides(tmp_path: Path) -> None:
    from uniref.train.config import RLConfig, SFTConfig

    paths = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))
    assert len(paths) >= 9  # the shipped recipes and the ablation arms
    for path in paths:
        kind = RLConfig if "rl" in read_yaml(path) else SFTConfig
        cfg = load_config(kind, path, ["train.max_steps=3", f"run.output_dir={tmp_path}"])
        assert cfg.train.max_steps == 3 and cfg.run.output_dir == tmp_path, path
