"""The Flow-GRPO SDE step, its log-prob and the SDE window (uniref.flow), in float64 against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from uniref import flow

SIGMA, SIGMA_NEXT = 0.7, 0.62
NOISE_LEVEL = 0.7  # Flow-GRPO's default for SD3 (the paper's Qwen run uses 1.5)


def _xv(dtype: torch.dtype, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 5, 6, generator=g, dtype=dtype), torch.randn(batch, 4, 5, 6, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sde_with_zero_noise_level_is_exactly_the_euler_step(dtype):
    x, v = _xv(dtype)
    step = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, noise_level=0.0, generator=torch.Generator().manual_seed(1))
    euler = flow.euler_step(x, v, SIGMA, SIGMA_NEXT)
    assert torch.equal(step.mean, euler) and torch.equal(step.x_next, euler)
    assert float(step.std) == 0.0


def test_sde_mean_and_std_match_the_flow_grpo_formula_in_float64():
    x, v = _xv(torch.float64)
    a, dt = NOISE_LEVEL, SIGMA_NEXT - SIGMA
    std_t = a * math.sqrt(SIGMA / (1 - SIGMA))
    mean = x * (1 + std_t**2 / (2 * SIGMA) * dt) + v * (1 + std_t**2 * (1 - SIGMA) / (2 * SIGMA)) * dt
    step = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, a, noise=torch.zeros_like(x))
    torch.testing.assert_close(step.mean, mean, rtol=0, atol=1e-14)
    assert float(step.std) == pytest.approx(std_t * math.sqrt(-dt), rel=1e-14)


def test_sde_log_prob_of_a_sampled_step_matches_the_closed_form_in_float64():
    x, v = _xv(torch.float64)
    step = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, NOISE_LEVEL, generator=torch.Generator().manual_seed(2))
    s = float(step.std)
    z = (step.x_next - step.mean) / s
    expected = (-0.5 * z**2 - math.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    assert step.log_prob.shape == (3,) and step.log_prob.dtype == torch.float64
    torch.testing.assert_close(step.log_prob, expected, rtol=0, atol=1e-12)
    # And as a sum of scipy-free per-element normal log-densities from torch.distributions.
    reference = torch.distributions.Normal(step.mean, s).log_prob(step.x_next).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, reference, rtol=0, atol=1e-12)


def test_sde_log_prob_recomputed_from_stored_x_next_equals_the_sampling_log_prob():
    x, v = _xv(torch.float32)
    sampled = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, NOISE_LEVEL, generator=torch.Generator().manual_seed(3))
    rescored = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, NOISE_LEVEL, x_next=sampled.x_next)
    assert torch.equal(rescored.log_prob, sampled.log_prob)  # the first-update policy ratio is exactly 1
    assert torch.equal(flow.sde_log_prob(sampled.x_next, sampled.mean, sampled.std), sampled.log_prob)


def test_sde_step_runs_in_fp32_for_bf16_inputs():
    x, v = _xv(torch.bfloat16)
    step = flow.sde_step(x, v, SIGMA, SIGMA_NEXT, NOISE_LEVEL, generator=torch.Generator().manual_seed(4))
    assert step.x_next.dtype == step.mean.dtype == step.log_prob.dtype == torch.float32


def test_sde_samples_have_the_stated_mean_and_std():
    # One (B=1) state, 20 000 draws per element: mean within 5 standard errors, std within 2 %.
    x, v = _xv(torch.float64, batch=1)
    draws = 20_000
    step = flow.sde_step(
        x.expand(draws, -1, -1, -1), v.expand(draws, -1, -1, -1), SIGMA, SIGMA_NEXT, NOISE_LEVEL,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    s = float(step.std)
    assert (step.x_next.mean(0) - step.mean[0]).abs().max() < 5 * s / math.sqrt(draws)
    assert (step.x_next.std(0) / s - 1).abs().max() < 0.02


def test_sde_per_sample_sigmas_equal_separate_scalar_steps():
    x, v = _xv(torch.float64, batch=2)
    sigma, sigma_next = torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.3])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    both = flow.sde_step(x, v, sigma, sigma_next, NOISE_LEVEL, noise=noise)
    for i in range(2):
        one = flow.sde_step(x[i : i + 1], v[i : i + 1], float(sigma[i]), float(sigma_next[i]), NOISE_LEVEL,
                            noise=noise[i : i + 1])  # fmt: skip
        torch.testing.assert_close(both.x_next[i : i + 1], one.x_next, rtol=0, atol=1e-7)
        torch.testing.assert_close(both.log_prob[i : i + 1], one.log_prob, rtol=0, atol=1e-7)


def test_sde_std_is_finite_at_sigma_one_via_the_cap():
    std_t = flow.sde_std_t(torch.tensor(1.0, dtype=torch.float64), NOISE_LEVEL, sigma_cap=0.98)
    assert float(std_t) == pytest.approx(NOISE_LEVEL * math.sqrt(1 / (1 - 0.98)), rel=1e-14)
    x, v = _xv(torch.float64)
    step = flow.sde_step(x, v, 1.0, 0.96, NOISE_LEVEL, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(step.x_next).all() and torch.isfinite(step.log_prob).all()


def test_sde_window_fixed_start_is_the_given_consecutive_steps():
    assert list(flow.sde_window(10, 3, start=2)) == [2, 3, 4]
    assert list(flow.sde_window(10, 9, start=0)) == list(range(9))  # full trajectory minus the last step


def test_sde_window_never_contains_the_last_step_and_covers_every_valid_start():
    g = torch.Generator().manual_seed(8)
    starts = set()
    for _ in range(200):
        w = flow.sde_window(8, 3, generator=g)
        assert len(w) == 3 and w.stop <= 7 and 7 not in w
        starts.add(w.start)
    assert starts == set(range(5))  # 0 .. N-1-w


@pytest.mark.parametrize(("window", "start"), [(0, None), (10, None), (3, 7), (3, -1)])
def test_sde_window_rejects_impossible_windows(window, start):
    with pytest.raises(ValueError, match="SDE window"):
        flow.sde_window(10, window, start=start)
