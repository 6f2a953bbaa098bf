"""Group advantages from several reward sources and the clipped policy-ratio loss (uniref.train.grpo)."""

from __future__ import annotations

import math

import pytest
import torch

from uniref.train import grpo

AGGREGATORS = sorted(grpo.AGGREGATORS)


def _rewards(*refs: tuple[float, ...], instruction: float = 0.5, quality: float = 0.5) -> list[dict[str, float]]:
    return [
        {**{f"ref_{k + 1}": r for k, r in enumerate(rs)}, "instruction": instruction, "quality": quality} for rs in refs
    ]


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_advantages_of_a_constant_reward_group_are_zero(aggregator, renormalize):
    rewards = _rewards(*[(0.7, 0.3)] * 6, instruction=0.9, quality=0.4)
    adv = grpo.compute_advantages(rewards, [0] * 6, aggregator, renormalize=renormalize)
    assert torch.equal(adv.advantages, torch.zeros(6)) and adv.valid.all()


def test_group_normalize_advantage_is_zero_mean_unit_std_per_group():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 20.0, 50.0], dtype=torch.float64)
    out = grpo.group_normalize(values, ["a", "a", "a", "b", "b", "b", "b"], eps=0.0)
    for members in (slice(0, 3), slice(3, 7)):
        assert out[members].mean().abs() < 1e-12 and out[members].std(unbiased=False) == pytest.approx(1.0)


def test_advantage_source_with_near_zero_spread_contributes_nothing():
    # Quality varies by less than MIN_GROUP_STD in the group: the advantage is instruction's alone.
    rewards = [
        {"instruction": i, "quality": 0.5 + 1e-5 * q} for i, q in zip([0.2, 0.8, 0.5, 0.9], [3, -1, 2, 0], strict=True)
    ]
    only_instruction = [{"instruction": r["instruction"]} for r in rewards]
    for aggregator in ("weighted_sum", "reconcile"):
        both = grpo.compute_advantages(rewards, [0] * 4, aggregator)
        alone = grpo.compute_advantages(only_instruction, [0] * 4, aggregator)
        torch.testing.assert_close(both.advantages, alone.advantages, rtol=0, atol=0)
        assert both.advantages.abs().sum() > 0


def test_advantage_zero_spread_threshold_is_per_group():
    values = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9], dtype=torch.float64)
    out = grpo.group_normalize(values, [0, 0, 0, 1, 1])
    assert torch.equal(out[:3], torch.zeros(3, dtype=torch.float64)) and (out[3:].abs() > 0.99).all()


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_advantage_excludes_failed_samples_from_the_statistics(aggregator):
    good = _rewards((0.9, 0.2), (0.4, 0.6), (0.1, 0.3), instruction=0.5)
    for i, r in enumerate(good):
        r["instruction"] = [0.3, 0.8, 0.6][i]
    failed_none = [*good, None]
    failed_nan = [*good, {**good[0], "quality": math.nan}]
    failed_missing = [*good, {k: v for k, v in good[0].items() if k != "ref_2"}]
    expected = grpo.compute_advantages(good, [0, 0, 0], aggregator).advantages
    for rewards in (failed_none, failed_nan, failed_missing):
        adv = grpo.compute_advantages(rewards, [0, 0, 0, 0], aggregator)
        assert adv.valid.tolist() == [True, True, True, False] and adv.dropped == 1
        assert adv.advantages[3] == 0.0
        torch.testing.assert_close(adv.advantages[:3], expected, rtol=0, atol=0)


def test_advantage_groups_are_normalised_independently():
    a = _rewards((0.9, 0.2), (0.4, 0.6), (0.1, 0.3))
    b = _rewards((0.5, 0.5, 0.1), (0.2, 0.9, 0.8))  # another prompt with K = 3
    together = grpo.compute_advantages(a + b, [7, 7, 7, 9, 9])
    torch.testing.assert_close(together.advantages[:3], grpo.compute_advantages(a, [7] * 3).advantages)
    torch.testing.assert_close(together.advantages[3:], grpo.compute_advantages(b, [9] * 2).advantages)


def test_advantages_are_clipped_to_a_max():
    rewards = [{"instruction": 1.0}] + [{"instruction": 0.0}] * 99  # the outlier is ~9.95 std above the mean
    adv = grpo.compute_advantages(rewards, [0] * 100, "weighted_sum", clip=grpo.ADV_CLIP)
    assert adv.advantages[0] == pytest.approx(grpo.ADV_CLIP) and adv.advantages.abs().max() <= grpo.ADV_CLIP


def test_gdpo_advantage_renormalises_the_combined_sum():
    rewards = _rewards((0.9, 0.2), (0.4, 0.6), (0.1, 0.3), (0.7, 0.7))
    for i, r in enumerate(rewards):
        r["instruction"] = [0.3, 0.8, 0.6, 0.1][i]
    adv = grpo.compute_advantages(rewards, [0] * 4, "weighted_sum", renormalize=True, eps=0.0).advantages.double()
    assert adv.mean().abs() < 1e-6 and adv.std(unbiased=False) == pytest.approx(1.0, abs=1e-6)


def test_softmin_advantage_source_lies_between_min_and_min_plus_tau_log_k():
    values = torch.rand(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tau = 0.05
    soft = grpo.softmin(values, tau)
    low = values.min(-1).values
    assert (soft >= low - 1e-12).all() and (soft <= low + tau * math.log(4) + 1e-12).all()
    equal = grpo.softmin(torch.full((1, 3), 0.6, dtype=torch.float64), tau)
    torch.testing.assert_close(equal, torch.tensor([0.6], dtype=torch.float64), rtol=0, atol=1e-15)


def test_reconcile_advantage_refuses_to_trade_a_reference_that_summed_rewards_drop():
    # A drops reference 2 entirely; B keeps both. The raw sum prefers A (1.0 > 0.9), reconcile prefers B.
    rewards = _rewards((1.0, 0.0), (0.45, 0.45))
    raw = grpo.compute_advantages(rewards, [0, 0], "raw_sum").advantages
    reconciled = grpo.compute_advantages(rewards, [0, 0], "reconcile").advantages
    assert raw[0] > raw[1] and reconciled[1] > reconciled[0]


def test_reconcile_advantage_reverses_the_per_source_weighted_sum_on_a_traded_reference():
    # In this group normalising each reference first makes A (1.0, 0.0) look better than B (0.45, 0.45).
    rewards = _rewards((1.0, 0.0), (0.45, 0.45), (0.4, 0.9), (0.4, 0.9))
    weighted = grpo.compute_advantages(rewards, [0] * 4, "weighted_sum").advantages
    reconciled = grpo.compute_advantages(rewards, [0] * 4, "reconcile").advantages
    assert weighted[0] > weighted[1] and reconciled[1] > reconciled[0]
    assert reconciled[0] == reconciled.min()  # the output that dropped a reference is the worst of the group


def test_advantage_agreement_is_one_for_the_same_update_and_negative_for_a_reversed_one():
    rewards = _rewards((1.0, 0.0), (0.45, 0.45))  # the trade above: raw_sum and reconcile rank A and B oppositely
    raw = grpo.compute_advantages(rewards, [0, 0], "raw_sum")
    reconciled = grpo.compute_advantages(rewards, [0, 0], "reconcile")
    assert grpo.advantage_agreement(raw.advantages, raw.advantages, raw.valid) == pytest.approx(1.0)
    assert grpo.advantage_agreement(reconciled.advantages, raw.advantages, raw.valid) == pytest.approx(-1.0)
    no_signal = grpo.compute_advantages(_rewards((0.5, 0.5), (0.5, 0.5)), [0, 0], "raw_sum")
    assert grpo.advantage_agreement(no_signal.advantages, raw.advantages, raw.valid) is None


def test_unknown_aggregator_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="reconcile"):
        grpo.compute_advantages(_rewards((0.1,), (0.2,)), [0, 0], "mean")


def test_grpo_ratio_is_one_and_gradient_is_the_plain_policy_gradient_when_logp_equals_old():
    logp = torch.tensor([-1.2, 0.3, 2.0, -0.5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    out = grpo.clipped_policy_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert float(out.ratio_mean) == 1.0 and float(out.clip_fraction) == 0.0
    (grad,) = torch.autograd.grad(out.loss, logp)
    pg = torch.zeros_like(logp, requires_grad=True)
    (pg_grad,) = torch.autograd.grad(-(adv * (pg + logp.detach())).mean(), pg)
    torch.testing.assert_close(grad, pg_grad, rtol=0, atol=1e-15)


def test_grpo_clipping_engages_past_one_plus_minus_epsilon():
    eps = 0.2
    old = torch.zeros(4, dtype=torch.float64)
    # ratios 1.5 (A>0: clipped), 0.5 (A<0: clipped), 1.1 and 0.9 (inside): the clipped ones get no gradient.
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    out = grpo.clipped_policy_loss(logp, old, adv, clip_range=eps)
    assert float(out.clip_fraction) == 0.5
    expected = (-(1 + eps) + (1 - eps) - 1.1 + 0.9) / 4
    assert float(out.loss.detach()) == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad[0] == 0 and grad[1] == 0 and grad[2] != 0 and grad[3] != 0


def test_grpo_pessimistic_side_is_not_clipped():
    # A > 0 with ratio below 1 − ε (and A < 0 above 1 + ε) keep the unclipped, worse objective and its gradient.
    logp = torch.log(torch.tensor([0.5, 1.5], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = grpo.clipped_policy_loss(logp, torch.zeros(2, dtype=torch.float64), adv, clip_range=0.2)
    assert float(out.loss.detach()) == pytest.approx((-0.5 + 1.5) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert (grad != 0).all()


def test_grpo_mask_leaves_dropped_samples_out_of_the_loss():
    logp = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 100.0], dtype=torch.float64)
    masked = grpo.clipped_policy_loss(logp, logp, adv, mask=torch.tensor([True, True, False]))
    plain = grpo.clipped_policy_loss(logp[:2], logp[:2], adv[:2])
    assert float(masked.loss) == float(plain.loss)


def test_grpo_kl_term_is_squared_mean_difference_over_twice_the_step_variance():
    mean = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean_ref = mean + 0.3
    std = 0.1
    kl = grpo.kl_to_reference(mean, mean_ref, std)
    torch.testing.assert_close(kl, torch.full((2,), 0.09 / (2 * 0.01), dtype=torch.float64))
    logp = torch.zeros(2, dtype=torch.float64)
    out = grpo.clipped_policy_loss(logp, logp, torch.zeros(2, dtype=torch.float64), kl=kl, kl_coef=0.5)
    assert float(out.loss.detach()) == pytest.approx(0.5 * 4.5) and float(out.kl) == pytest.approx(4.5)


def test_ref_conflict_counts_pairs_the_references_rank_oppositely() -> None:
    # Group "a": A = (1, 0) drops reference 2, B = (0.45, 0.45), C = (0.8, 0.6).
    # (A, B): reference 1 prefers A by 0.55, reference 2 prefers B by 0.45 -> conflict.
    # (A, C): reference 1 prefers A by 0.2, reference 2 prefers C by 0.6 -> conflict.
    # (B, C): C is better on both -> none. Group "b" has one reference: its one pair cannot conflict.
    rewards = [
        {"ref_1": 1.0, "ref_2": 0.0},
        {"ref_1": 0.45, "ref_2": 0.45},
        {"ref_1": 0.8, "ref_2": 0.6},
        {"ref_1": 0.3},
        {"ref_1": 0.9},
    ]
    table = grpo.reward_table(rewards, ["a", "a", "a", "b", "b"])
    assert grpo.ref_conflict_fraction(table) == pytest.approx(2 / 4)
    # A difference within the margin is no preference: at 0.3, (A, C)'s 0.2 no longer votes.
    assert grpo.ref_conflict_fraction(table, margin=0.3) == pytest.approx(1 / 4)
    single = grpo.reward_table([{"ref_1": 0.1}, {"ref_1": 0.7}], [0, 0])
    assert grpo.ref_conflict_fraction(single) == 0.0
