"""The ablation driver's bookkeeping: equal compute per arm, curves and time-to-reward."""

import pytest
from benchmarks.ablations import smooth, train_hours
from benchmarks.ablations_rl import VAL_KEY, time_to_reach, training_seconds
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
