"""Rectified-flow pieces as small pure functions: schedule, ODE step, guidance, training noise.

Convention (as diffusers and Qwen-Image): σ = 1 is pure noise, σ = 0 is data, and

    x_t = (1 − σ)·x_0 + σ·ε,        v = dx_t/dσ = ε − x_0.

Sampling integrates from σ = 1 down to σ = 0 with Euler steps ``x ← x + (σ_next − σ)·v``.
The SDE step and its log-probability (MSGRPO) live with the RL code, not here.
"""

from __future__ import annotations

import math

import torch

from uniref.models.base import ScheduleSpec


def calculate_shift(image_seq_len: int, spec: ScheduleSpec) -> float:
    """Resolution shift ``mu``, linear in the target's token count L through two points:

        mu(L) = base_shift + (max_shift − base_shift)·(L − base_seq_len) / (max_seq_len − base_seq_len)

    With Qwen-Image's config (256 → 0.5, 8192 → 0.9) a 1024² target (4096 tokens) gives mu ≈ 0.69,
    i.e. a sigma shift ``e^mu`` ≈ 2.0.
    """
    slope = (spec.max_shift - spec.base_shift) / (spec.max_seq_len - spec.base_seq_len)
    return spec.base_shift + slope * (image_seq_len - spec.base_seq_len)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static time shift ``σ' = s·σ / (1 + (s − 1)·σ)``; s > 1 spends more steps at high noise.

    The exponential shift of diffusers, ``e^mu / (e^mu + (1/σ − 1))``, is this with ``s = e^mu``.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def stretch_to_terminal(sigma: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch a decreasing schedule so its last value is ``terminal``, keeping σ = 1 fixed:

    ``σ' = 1 − (1 − σ)·(1 − terminal) / (1 − σ_last)``.
    """
    return 1 - (1 - sigma) * (1 - terminal) / (1 - sigma[-1])


def sigmas(num_steps: int, image_seq_len: int, spec: ScheduleSpec | None = None) -> torch.Tensor:
    """The sampling schedule (num_steps + 1,) float64, from 1 (noise) down to a final 0.

    As diffusers' ``FlowMatchEulerDiscreteScheduler`` used by ``QwenImageEditPlusPipeline``:

    1. ``σ_i = linspace(1, 1/N, N)``;
    2. shift: ``s = e^mu`` with ``mu = calculate_shift(image_seq_len)`` if ``spec.dynamic_shift``,
       else ``s = spec.shift``; ``σ ← s·σ / (1 + (s − 1)·σ)``;
    3. if ``spec.shift_terminal``: stretch so the last sigma equals it (not for N = 1, where the
       stretch is 0/0 — diffusers returns NaN there; we keep the single step 1 → 0);
    4. append σ_N = 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps {num_steps}: need at least one step")
    spec = spec or ScheduleSpec()
    sigma = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shift = math.exp(calculate_shift(image_seq_len, spec)) if spec.dynamic_shift else spec.shift
    sigma = shift_sigma(sigma, shift)
    if spec.shift_terminal and num_steps > 1:
        sigma = stretch_to_terminal(sigma, spec.shift_terminal)
    return torch.cat([sigma, sigma.new_zeros(1)])


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """One ODE step of dx/dσ = v: ``x_next = x + (σ_next − σ)·v`` (σ_next < σ, so this removes noise).

    Computed in float32 at least (as diffusers upcasts), returned in ``v``'s dtype.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    return (x.to(work) + (sigma_next - sigma) * v.to(work)).to(v.dtype)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance with norm rescale (as diffusers' QwenImageEditPlusPipeline):

        g = u + scale·(c − u);        out = g · ‖c‖ / ‖g‖

    with norms over the last (feature) axis of each token, so guidance changes direction only.
    """
    guided = uncond + scale * (cond - uncond)
    return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


def sample_training_sigmas(
    n: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training noise levels (n,): logit-normal then shifted (UniPic-3 SFT):

    u ~ N(logit_mean, logit_std²),   σ = sigmoid(u),   σ ← s·σ / (1 + (s − 1)·σ).
    """
    u = torch.randn(n, generator=generator, dtype=torch.float64) * logit_std + logit_mean
    return shift_sigma(torch.sigmoid(u), shift).to(dtype)


def add_noise(x_0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_t = (1 − σ)·x_0 + σ·ε``; a tensor σ broadcasts from the leading (batch) axis."""
    if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
        sigma = sigma.reshape(sigma.shape + (1,) * (x_0.dim() - sigma.dim()))
    return (1 - sigma) * x_0 + sigma * noise


def velocity_target(x_0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = ε − x_0`` (constant along the straight path)."""
    return noise - x_0
