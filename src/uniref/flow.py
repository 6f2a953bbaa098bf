"""Rectified-flow pieces as small pure functions: schedule, ODE step, guidance, training noise.

Convention (as diffusers and Qwen-Image): σ = 1 is pure noise, σ = 0 is data, and

    x_t = (1 − σ)·x_0 + σ·ε,        v = dx_t/dσ = ε − x_0.

Sampling integrates from σ = 1 down to σ = 0 with Euler steps ``x ← x + (σ_next − σ)·v``.
The Flow-GRPO SDE step, its Gaussian log-probability and the SDE window (MSGRPO) are at the end;
group advantages and the policy loss are in :mod:`uniref.train.grpo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduleSpec:
    """Sigma-schedule settings (as diffusers' ``FlowMatchEulerDiscreteScheduler`` config).

    With ``dynamic_shift`` the shift depends on the target's token count: ``mu`` is linear in it
    between (base_seq_len, base_shift) and (max_seq_len, max_shift), and sigmas are warped by
    ``e^mu / (e^mu + (1/σ − 1))``. ``shift_terminal`` (if set) stretches the schedule so that the
    last sigma equals it. Defaults are Qwen-Image's scheduler config.
    """

    dynamic_shift: bool = True
    base_seq_len: int = 256
    max_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift: float = 1.0  # static shift, used when dynamic_shift is False
    shift_terminal: float | None = 0.02


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


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, rescale: bool = True) -> torch.Tensor:
    """True classifier-free guidance with norm rescale (as diffusers' QwenImageEditPlusPipeline):

        g = u + scale·(c − u);        out = g · ‖c‖ / ‖g‖

    with norms over the last (feature) axis of each token, so guidance changes direction only.
    ``rescale=False`` returns ``g`` itself (diffusers' QwenImage21Pipeline).
    """
    guided = uncond + scale * (cond - uncond)
    if not rescale:
        return guided
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


# --- Flow-GRPO SDE step and log-prob (MSGRPO) -------------------------------------------------------------------

# std_t = a·sqrt(σ/(1−σ)) is infinite at σ = 1 (the first step of every schedule). As Flow-GRPO, the σ in the
# denominator is capped: std_t = a·sqrt(σ / (1 − min(σ, σ_cap))). Flow-GRPO caps at the schedule's second sigma
# (pass ``sigma_cap=float(sigmas[1])`` to reproduce it); the default 0.99 is about that value for 25 steps under
# Qwen-Image's shift (σ_1 ≈ 0.99 at 1024²), and only σ above the cap are affected.
SDE_SIGMA_CAP = 0.99
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    """One stochastic step σ → σ_next; tensors in the work dtype (float32, or float64 when given float64)."""

    x_next: torch.Tensor  # (B, ...) the sampled next state
    mean: torch.Tensor  # (B, ...) μ, the Gaussian mean of x_next (carries the gradient of v)
    std: torch.Tensor  # (B, 1, ...) or () step std  std_t·sqrt(−dt), broadcastable to x
    log_prob: torch.Tensor  # (B,) log N(x_next; μ, std²) averaged over the non-batch dims


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a tensor of ``like``'s dtype that broadcasts against it: () or (B, 1, ..., 1)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() > 0:
        t = t.reshape(t.shape + (1,) * (like.dim() - t.dim()))
    return t


def sde_std_t(sigma: torch.Tensor, noise_level: float, sigma_cap: float = SDE_SIGMA_CAP) -> torch.Tensor:
    """Diffusion coefficient ``std_t = a·sqrt(σ / (1 − min(σ, σ_cap)))`` (finite at σ = 1, see SDE_SIGMA_CAP)."""
    return noise_level * torch.sqrt(sigma / (1 - sigma.clamp(max=sigma_cap)))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    x_next: torch.Tensor | None = None,
    sigma_cap: float = SDE_SIGMA_CAP,
) -> SDEStep:
    """One Flow-GRPO SDE step (yifan123/flow_grpo ``sd3_sde_with_logprob``), ``dt = σ_next − σ < 0``:

        std_t  = a·sqrt(σ / (1 − σ))                          (σ capped in the denominator, see SDE_SIGMA_CAP)
        μ      = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1 − σ)/(2σ))·dt
        x_next = μ + std_t·sqrt(−dt)·ε,                       ε ~ N(0, I)
        logp   = mean over non-batch dims of  −(x_next − μ)²/(2·s²) − log s − log sqrt(2π),   s = std_t·sqrt(−dt)

    The SDE shares the ODE's marginals: with a = 0 it is exactly :func:`euler_step` (μ = x + dt·v, s = 0; the
    log-prob of a deterministic step is undefined and comes out NaN — do not train such steps). ``std_t²/(2σ)``
    is evaluated as ``a²/(2(1 − min(σ, σ_cap)))``, the same value without a division by σ.

    ``sigma``/``sigma_next``: floats or (B,) tensors. ``noise``: ε (default: drawn with ``generator``).
    ``x_next``: score a given next state instead of sampling one (the trainer recomputes the log-prob of the
    stored rollout under the current policy's μ). Computed in float32 (float64 if ``x`` or ``v`` is float64,
    and always fp32 or wider: bf16 rounding moves the policy ratio off 1).
    """
    work = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
    x, v = x.to(work), v.to(work)
    sigma_t = _per_sample(sigma, x)
    dt = _per_sample(sigma_next - sigma, x)  # differenced before the cast, as euler_step does: a = 0 matches it bitwise
    std_t = sde_std_t(sigma_t, noise_level, sigma_cap)
    std_sq_over_2sigma = noise_level**2 / (2 * (1 - sigma_t.clamp(max=sigma_cap)))  # = std_t²/(2σ)
    mean = x * (1 + std_sq_over_2sigma * dt) + v * (1 + std_sq_over_2sigma * (1 - sigma_t)) * dt
    std = std_t * torch.sqrt(-dt)
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=work, device=x.device)
        x_next = mean + std * noise.to(work)
    else:
        x_next = x_next.to(work)
    return SDEStep(x_next=x_next, mean=mean, std=std, log_prob=sde_log_prob(x_next, mean, std))


def sde_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """(B,) Gaussian log-density of ``x_next`` under N(mean, std²), averaged over all non-batch dims:

        logp = mean_dims( −(x_next − μ)²/(2·std²) − log std − log sqrt(2π) )

    ``std`` broadcasts against ``x_next`` (scalar or (B, 1, ...)). Computed in float32 or wider. The average
    (not the sum) over dims is Flow-GRPO's: it keeps the ratio exp(logp − logp_old) near 1 whatever the size.
    """
    work = torch.promote_types(torch.promote_types(x_next.dtype, mean.dtype), torch.float32)
    x_next, mean = x_next.to(work), mean.to(work)
    std = torch.as_tensor(std, dtype=work, device=x_next.device)
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x_next.dim())))


def sde_window(
    num_steps: int, window_size: int, *, start: int | None = None, generator: torch.Generator | None = None
) -> range:
    """The step indices that are stochastic (SDE) and trained; every other step is an ODE (Euler) step.

    Step ``i`` goes σ_i → σ_{i+1} of a ``num_steps``-step schedule. The last, lowest-noise step (i = N − 1,
    to σ = 0) is never in the window: its Gaussian is too sharp to train (Flow-GRPO). The window is the
    ``window_size`` consecutive steps from ``start``; ``start = None`` draws it uniformly from the valid
    positions ``0 .. N − 1 − window_size`` with ``generator`` (Flow-GRPO-Fast / MixGRPO; a MixGRPO-style sliding
    window passes its own ``start``). ``window_size = N − 1`` is the full trajectory of Flow-GRPO.
    """
    trainable = num_steps - 1  # steps 0 .. N-2
    if not 1 <= window_size <= trainable:
        raise ValueError(
            f"SDE window of {window_size} steps in a {num_steps}-step schedule: need 1 <= window <= {trainable} "
            "(the last step is never stochastic)"
        )
    last_start = trainable - window_size
    if start is None:
        start = int(torch.randint(last_start + 1, (1,), generator=generator).item())
    elif not 0 <= start <= last_start:
        raise ValueError(f"SDE window start {start}: need 0 <= start <= {last_start} for {window_size} of {num_steps}")
    return range(start, start + window_size)
