import json
from pathlib import Path

import pytest
import torch

from uniref.config import load_config
from uniref.train.checkpoint import latest_checkpoint, load_checkpoint
from uniref.train.config import RLConfig
from uniref.train.msgrpo import train_rl

RL_TINY = [
    "model.name=tiny-random",
    "model.tiny={width: 32, depth: 1, heads: 2, rope_axes: [4, 6, 6], text_layers: 1, mlp_ratio: 2}",
    "data.max_refs=3",
    "data.size_range='32:64'",
    "rl.prompts_per_step=2",
    "rl.group_size=3",
    "rl.sample_steps=4",
    "rl.window=2",
    "rl.budget=32",
    "optim.lr=1e-3",
    "log.log_every=1",
    "log.checkpoint_every=1",
    "log.tensorboard=false",
    "log.progress=false",
    "log.val_samples=0",
    "log.preview_every=1000",
]


def _config(out: Path, *extra: str) -> RLConfig:
    return load_config(RLConfig, "configs/tiny_msgrpo.yaml", [*RL_TINY, f"run.output_dir={out}", *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_first_update_ratio_is_exactly_one_and_rewards_are_logged_by_source(tmp_path: Path) -> None:
    summary = train_rl(_config(tmp_path, "train.max_steps=2"))
    assert summary.steps == 2
    rows = _metrics(tmp_path)
    assert [r["ratio_mean"] for r in rows] == [1.0, 1.0]  # rollout and update see bit-identical log-probs
    assert all(r["clip_fraction"] == 0.0 for r in rows)
    for key in ("reward/ref_mean", "reward/worst_ref", "reward/instruction", "reward/quality", "grad_norm"):
        assert key in rows[0]
    assert rows[0]["reward/worst_ref"] <= rows[0]["reward/ref_mean"]
    assert all(0.0 <= r["ref_conflict"] <= 1.0 for r in rows)
    agreement = [r["adv_agreement_raw_sum"] for r in rows if "adv_agreement_raw_sum" in r]
    assert agreement and all(-1.0 - 1e-9 <= a <= 1.0 + 1e-9 for a in agreement)  # reconcile vs the summed reward


def test_grpo_update_changes_the_weights_and_resume_is_exact(tmp_path: Path) -> None:
    train_rl(_config(tmp_path / "a", "train.max_steps=2"))
    train_rl(_config(tmp_path / "b", "train.max_steps=1"))
    train_rl(_config(tmp_path / "b", "train.max_steps=2"))
    wa, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    wb, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w1, _, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000001")
    assert any(not torch.equal(wa[k], w1[k]) for k in wa)


def test_grpo_kl_to_the_starting_policy_is_zero_before_the_first_update(tmp_path: Path) -> None:
    train_rl(_config(tmp_path, "train.max_steps=2", "rl.kl_coef=0.1"))
    rows = _metrics(tmp_path)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0


def test_grpo_failed_rewards_drop_samples_and_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uniref.train.msgrpo as msgrpo
    from uniref.rewards import SceneRewards

    class Flaky(SceneRewards):
        def score(self, samples, outputs):
            scores = super().score(samples, outputs)
            return [None if i == 1 else s for i, s in enumerate(scores)]  # one failed call per step

    monkeypatch.setattr(msgrpo, "build_reward_source", lambda section: Flaky())
    train_rl(_config(tmp_path, "train.max_steps=1"))
    assert _metrics(tmp_path)[0]["dropped"] == 1


def test_grpo_lora_run_exports_adapters(tmp_path: Path) -> None:
    summary = train_rl(
        _config(
            tmp_path,
            "train.max_steps=1",
            "model.lora.enabled=true",
            "model.lora.rank=2",
            "model.lora.target_modules=[qkv, modulation]",
            "rl.kl_coef=0.1",
        )
    )
    assert summary.steps == 1
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert _metrics(tmp_path)[0]["kl"] == 0.0  # adapters start at zero: the policy is the base


def test_grpo_raises_a_learnable_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, the policy gradient points uphill: a reward for brighter outputs goes up within ~20
    updates (sign, log-probs, advantages and optimizer wired together)."""
    import numpy as np

    import uniref.train.msgrpo as msgrpo

    class Brightness:
        def score(self, samples, outputs):
            # Centred and scaled so a group of the random model spreads well above MIN_GROUP_STD.
            means = [np.asarray(o, dtype=np.float32).mean() / 255 for o in outputs]
            return [{"quality": float(np.clip(0.5 + 20 * (m - 0.475), 0, 1))} for m in means]

    monkeypatch.setattr(msgrpo, "build_reward_source", lambda section: Brightness())
    train_rl(
        _config(
            tmp_path,
            "train.max_steps=24",
            "rl.group_size=8",
            "rl.aggregator=raw_sum",
            "optim.lr=3e-3",
            "log.checkpoint_every=100",
        )
    )
    reward = [r["reward/quality"] for r in _metrics(tmp_path)]
    first, last = sum(reward[:6]) / 6, sum(reward[-6:]) / 6
    assert last > first + 0.15, (first, last)
