"""The ablation driver's bookkeeping: equal compute per arm, curves and time-to-reward."""

from types import SimpleNamespace

import pytest
from benchmarks.ablations import arm_run, main, replicate_overrides, smooth, train_hours
from benchmarks.ablations_rl import VAL_KEY, paired_bootstrap, time_to_reach, training_seconds
from benchmarks.ablations_sft import ARMS, compute_units


def test_every_sft_arm_spends_the_same_compute() -> None:
    units = {name: compute_units(name) for name in ARMS}
    assert max(units.values()) - min(units.values()) <= 0.01 * max(units.values()), units


def test_smooth_is_a_trailing_moving_average() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_train_hours_leave_out_pauses_between_sessions() -> None:
    rows = [{"loss": 1, "time": t} for t in (0, 10, 20, 5000, 5010)]
    assert train_hours(rows) == pytest.approx(30 / 3600)


def test_time_to_reward_counts_training_seconds_until_validation_first_reaches_the_level() -> None:
    rows = [{"step": s, "step_seconds": 2.0} for s in range(1, 11)]
    rows += [{"step": 5, VAL_KEY: 0.3}, {"step": 10, VAL_KEY: 0.5}]
    assert training_seconds(rows)[-1] == (10, 20.0)
    assert time_to_reach(rows, 0.3) == 10.0
    assert time_to_reach(rows, 0.4) == 20.0
    assert time_to_reach(rows, 0.6) is None


def test_a_replicate_gets_its_own_seed_prompts_and_folder() -> None:
    assert replicate_overrides("rl_reconcile", 0) == []
    first, second = replicate_overrides("rl_reconcile", 1), replicate_overrides("rl_reconcile", 2)
    assert first[0] == "run.seed=1" and second[0] == "run.seed=2"
    offsets = {o for o in first + second if o.startswith("data.seed_offset=")}
    assert len(offsets) == 2  # other prompts in each replicate
    assert first[2] == f"run.output_dir={arm_run('rl_reconcile', 1)}" != f"run.output_dir={arm_run('rl_reconcile')}"


def _report(values: list[float]) -> SimpleNamespace:
    return SimpleNamespace(records=[SimpleNamespace(score=SimpleNamespace(worst_ref=v)) for v in values])


def test_paired_bootstrap_is_zero_for_equal_arms_and_brackets_a_shift() -> None:
    base = [0.1, 0.5, 0.2, 0.9, 0.3, 0.7]
    assert paired_bootstrap(_report(base), _report(base), "worst_ref") == (0.0, 0.0, 0.0)
    mean, lo, hi = paired_bootstrap(
        _report(base), _report([v + 0.1 + 0.02 * (i % 2) for i, v in enumerate(base)]), "worst_ref"
    )
    assert mean == pytest.approx(0.11)
    assert 0.1 <= lo <= mean <= hi <= 0.12


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["sft", "--replicate", "1"], "--replicate"),
        (["rl", "--replicate", "-1"], "--replicate"),
        (["sft", "--arms", "sft_fixed64,sft_nope"], "sft_nope"),
        (["rl", "--arms", "sft_fixed64"], "--arms"),
    ],
)
def test_a_bad_replicate_or_arm_list_is_refused_in_one_line(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]
