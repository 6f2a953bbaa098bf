"""uniref.flow in float64 against closed forms and against diffusers' scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from uniref import flow
from uniref.models.base import ScheduleSpec

# Qwen-Image's scheduler/scheduler_config.json (the values ScheduleSpec defaults to).
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "num_train_timesteps": 1000,
}


def _diffusers_sigmas(steps: int, seq_len: int, config: dict) -> torch.Tensor:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(
        seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"]
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.double()


def test_calculate_shift_hits_both_anchor_points():
    spec = ScheduleSpec()
    assert flow.calculate_shift(256, spec) == pytest.approx(0.5, abs=1e-15)
    assert flow.calculate_shift(8192, spec) == pytest.approx(0.9, abs=1e-15)


@pytest.mark.parametrize(("side", "expected"), [(1024, 2.0), (1536, 2.6), (2048, 3.7)])
def test_resolution_shift_matches_design_numbers(side, expected):
    # DESIGN §5: sigma shift about 2.0 / 2.6 / 3.7 at 1024² / 1536² / 2048² (16 px per token).
    mu = flow.calculate_shift(side * side // 256, ScheduleSpec())
    assert math.exp(mu) == pytest.approx(expected, abs=0.05)


def test_exponential_shift_equals_static_shift_with_e_mu():
    sigma = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    mu = 0.7
    exponential = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    torch.testing.assert_close(flow.shift_sigma(sigma, math.exp(mu)), exponential, rtol=0, atol=1e-15)


def test_stretch_ends_at_terminal_and_keeps_one():
    sigma = torch.tensor([1.0, 0.7, 0.4, 0.2], dtype=torch.float64)
    out = flow.stretch_to_terminal(sigma, 0.02)
    assert out[0].item() == pytest.approx(1.0, abs=1e-15)
    assert out[-1].item() == pytest.approx(0.02, abs=1e-15)


def test_sigmas_closed_form_without_shift():
    spec = ScheduleSpec(dynamic_shift=False, shift=1.0, shift_terminal=None)
    expected = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(flow.sigmas(4, 4096, spec), expected, rtol=0, atol=1e-15)


def test_sigmas_are_decreasing_from_one_to_zero():
    s = flow.sigmas(20, 4096)
    assert s.dtype == torch.float64 and s.shape == (21,)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("steps", [2, 8, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 4096, 16384])
def test_sigmas_match_diffusers_scheduler_with_qwen_config(steps, seq_len):
    # diffusers computes in float32, so agreement is to float32 rounding.
    ours = flow.sigmas(steps, seq_len, ScheduleSpec())
    theirs = _diffusers_sigmas(steps, seq_len, QWEN_SCHEDULER_CONFIG)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_single_step_schedule_goes_from_noise_to_data():
    # diffusers' terminal stretch is 0/0 (NaN) for one step; ours is the plain single step.
    torch.testing.assert_close(flow.sigmas(1, 4096), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_sigmas_match_diffusers_scheduler_with_static_shift():
    config = {"shift": 3.0, "use_dynamic_shifting": False}
    spec = ScheduleSpec(dynamic_shift=False, shift=3.0, shift_terminal=None)
    full = {**QWEN_SCHEDULER_CONFIG, **config, "shift_terminal": None}
    torch.testing.assert_close(flow.sigmas(10, 999, spec), _diffusers_sigmas(10, 999, full), rtol=0, atol=1e-6)


def test_euler_steps_integrate_a_straight_path_exactly():
    # Along x_t = (1 − σ)·x_0 + σ·ε the velocity ε − x_0 is constant, so Euler is exact from any schedule.
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(5, 7, dtype=torch.float64, generator=g)
    eps = torch.randn(5, 7, dtype=torch.float64, generator=g)
    s = flow.sigmas(7, 1000)
    x = eps.clone()
    for i in range(7):
        x = flow.euler_step(x, flow.velocity_target(x_0, eps), s[i], s[i + 1])
    torch.testing.assert_close(x, x_0, rtol=0, atol=1e-12)


def test_euler_step_matches_diffusers_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
    sched.set_timesteps(sigmas=[1.0, 0.5], mu=0.6)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    theirs = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    ours = flow.euler_step(x, v, sched.sigmas[0], sched.sigmas[1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_true_cfg_keeps_conditional_norm_per_token():
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(3, 10, 8, dtype=torch.float64, generator=g)
    uncond = torch.randn(3, 10, 8, dtype=torch.float64, generator=g)
    out = flow.true_cfg(cond, uncond, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1), rtol=0, atol=1e-12)
    guided = uncond + 4.0 * (cond - uncond)
    cosine = torch.nn.functional.cosine_similarity(out, guided, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-12)


def test_true_cfg_with_scale_one_is_the_conditional_prediction():
    cond = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(flow.true_cfg(cond, torch.randn(4, 6, dtype=torch.float64), 1.0), cond)


def test_training_sigmas_are_shifted_sigmoid_of_the_same_normals():
    n, shift = 1000, 3.0
    u = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = shift * torch.sigmoid(u) / (1 + (shift - 1) * torch.sigmoid(u))
    got = flow.sample_training_sigmas(n, shift, torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    assert bool(((got > 0) & (got < 1)).all())


def test_training_sigma_median_is_shifted_one_half():
    # sigmoid(N(0,1)) has median 1/2; the shift maps it to s/(1+s).
    got = flow.sample_training_sigmas(20001, 3.0, torch.Generator().manual_seed(4), dtype=torch.float64)
    assert got.median().item() == pytest.approx(3.0 / 4.0, abs=0.01)


def test_noising_endpoints_and_target():
    x_0 = torch.randn(2, 3, 4, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.add_noise(x_0, eps, 0.0), x_0)
    torch.testing.assert_close(flow.add_noise(x_0, eps, 1.0), eps)
    sigma = torch.tensor([0.25, 0.5], dtype=torch.float64)
    x_t = flow.add_noise(x_0, eps, sigma)
    torch.testing.assert_close(x_t[1], 0.5 * x_0[1] + 0.5 * eps[1], rtol=0, atol=1e-15)
    # The derivative of x_t in σ is the target.
    d = 1e-6
    torch.testing.assert_close(
        (flow.add_noise(x_0, eps, 0.3 + d) - flow.add_noise(x_0, eps, 0.3)) / d,
        flow.velocity_target(x_0, eps),
        rtol=0,
        atol=1e-8,
    )


def test_training_sigmas_logit_mean_and_std_move_the_normal():
    u = torch.randn(100, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.5 - 1.0
    got = flow.sample_training_sigmas(
        100, 1.0, torch.Generator().manual_seed(6), dtype=torch.float64, logit_mean=-1.0, logit_std=0.5
    )
    torch.testing.assert_close(got, torch.sigmoid(u), rtol=0, atol=1e-15)
