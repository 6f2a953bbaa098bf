"""MSGRPO: multi-source GRPO for multi-reference generation.

Each optimizer step:

1. **Rollout.** Take P prompts (instruction + K references) and sample G outputs of each with the
   current policy: T Euler steps, except inside an SDE window of W steps, where

       x_next = μ + s·ε,   μ = x·(1 + std_t²/(2σ)·dt) + v·(1 + std_t²·(1−σ)/(2σ))·dt,   s = std_t·sqrt(−dt),
       std_t = a·sqrt(σ/(1−σ)),   dt = σ_next − σ < 0,

   and the Gaussian log-prob ``logp_old`` of every sampled x_next is kept (fp32, averaged over dims).
2. **Rewards.** Score every output with every source: one per reference (``ref_1..ref_K``), plus
   ``instruction`` and ``quality``. A failed reward call is retried and then the sample is dropped
   (counted), never scored 0.
3. **Advantages.** Normalise each source within its group of G; combine with the reconciling
   aggregator, ``A = w_ref·N_g(softmin_τ(r_1..r_K)) + Σ_s w_s·N_g(r_s)``, so that no reference can
   be traded away (``weighted_sum`` and Flow-GRPO's ``raw_sum`` are options); clip to ±A_max.
4. **Update.** Recompute the log-prob of the stored x_next under the current policy at each window
   step and minimise ``mean(max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))) + β·KL`` with
   ``ratio = exp(logp − logp_old)`` (exactly 1 on this first and only update per rollout).

Launch (it starts from the shipped tiny model and makes its prompts itself):

    uniref train rl --config configs/tiny_msgrpo.yaml train.max_steps=50 run.output_dir=runs/msgrpo
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from uniref import flow
from uniref.data.sample import Sample
from uniref.images import image_size
from uniref.models import EditModel
from uniref.pipeline import EditPipeline, Prepared, pack_for_denoising, target_velocity
from uniref.rewards import RewardSource, SceneRewards
from uniref.rewards.sources import with_overall
from uniref.sequence import PackedBatch
from uniref.train.config import RewardSection, RLConfig, RLSection
from uniref.train.grpo import (
    advantage_agreement,
    clipped_policy_loss,
    compute_advantages,
    kl_to_reference,
    ref_conflict_fraction,
)
from uniref.train.observe import Observer
from uniref.train.runtime import Runtime, start_run
from uniref.train.sft import RunSummary, noise_seed


@dataclass
class Rollout:
    """G outputs per prompt, with what the update needs at every SDE (window) step."""

    prepared: Prepared
    batch: PackedBatch
    window: list[int]  # trained step indices
    x: list[list[torch.Tensor]]  # [j][i]: sample i's target tokens before window step j
    x_next: list[list[torch.Tensor]]  # [j][i]: the sampled next tokens
    old_log_prob: torch.Tensor  # (W, B)
    final: list[torch.Tensor]  # per sample: final target tokens (L_i, D)


def rollout(
    pipe: EditPipeline, samples: Sequence[Sample], rl: RLSection, seeds: Sequence[int], window_seed: int
) -> Rollout:
    """Sample one output per entry of ``samples`` (the caller repeats each prompt G times)."""
    model = pipe.model
    prep = pipe.prepare(
        [s.instruction for s in samples],
        [s.refs for s in samples],
        steps=rl.sample_steps,
        guidance=rl.guidance,
        seed=list(seeds),
        budget=rl.budget,
        target_budget=rl.target_budget or rl.budget,
        target_like=[image_size(s.target) for s in samples],
    )
    batch = pack_for_denoising(prep.sequences, prep.cond, prep.neg_cond)
    window = list(
        flow.sde_window(
            rl.sample_steps, rl.window, start=rl.window_start, generator=torch.Generator().manual_seed(window_seed)
        )
    )
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    xs = [seq.tokens[: seq.num_target_tokens].clone() for seq in prep.sequences]
    rec_x, rec_next, rec_logp = [], [], []
    with torch.no_grad():
        for i in range(rl.sample_steps):
            sigma = torch.stack([s[i] for s in prep.schedules])
            v = target_velocity(model, batch, xs, prep.cond, prep.neg_cond, sigma, prep.guidance)
            if i in window:
                steps = [
                    flow.sde_step(x[None], vi[None], s[i], s[i + 1], rl.noise_level, generator=g)
                    for x, vi, s, g in zip(xs, v, prep.schedules, generators, strict=True)
                ]
                rec_x.append(xs)
                xs = [st.x_next[0].to(x.dtype) for st, x in zip(steps, xs, strict=True)]
                rec_next.append(xs)
                rec_logp.append(torch.cat([st.log_prob for st in steps]))
            else:
                xs = [
                    flow.euler_step(x, vi, s[i].float(), s[i + 1].float())
                    for x, vi, s in zip(xs, v, prep.schedules, strict=True)
                ]
    return Rollout(prep, batch, window, rec_x, rec_next, torch.stack(rec_logp), xs)


def policy_log_probs(
    model: EditModel, ro: Rollout, j: int, noise_level: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(B,) log-probs of the stored x_next of window step ``j`` under the current model, with the step
    means and stds (for the KL term)."""
    prep, i = ro.prepared, ro.window[j]
    sigma = torch.stack([s[i] for s in prep.schedules])
    v = target_velocity(model, ro.batch, ro.x[j], prep.cond, prep.neg_cond, sigma, prep.guidance)
    steps = [
        flow.sde_step(x[None], vi[None], s[i], s[i + 1], noise_level, x_next=xn[None])
        for x, vi, xn, s in zip(ro.x[j], v, ro.x_next[j], prep.schedules, strict=True)
    ]
    return torch.cat([st.log_prob for st in steps]), [st.mean for st in steps], [st.std for st in steps]


def build_reward_source(section: RewardSection) -> RewardSource:
    if section.kind == "scenes":
        return SceneRewards()
    from uniref.rewards import RetryPolicy

    retry = RetryPolicy(max_retries=section.max_retries, timeout=section.timeout)
    if section.kind == "http":
        from uniref.rewards import HTTPRewardSource

        return HTTPRewardSource(_need(section.url, "reward.url"), retry=retry)
    from uniref.rewards import JudgeConfig, VLMJudge

    return VLMJudge(
        JudgeConfig(
            base_url=_need(section.url, "reward.url"),
            model=_need(section.judge_model, "reward.judge_model"),
            api_key_env=section.api_key_env,
            retry=retry,
        )
    )


def _need(value: str | None, key: str) -> str:
    if not value:
        from uniref.errors import ConfigError

        raise ConfigError(f"{key}: required for this reward kind")
    return value


@contextlib.contextmanager
def reference_policy(model: EditModel, frozen: torch.nn.Module | None) -> Iterator[None]:
    """Run ``model`` as the reference policy: LoRA adapters disabled, or the frozen starting weights."""
    net = model.denoiser()
    if frozen is None:  # LoRA: the base weights are the reference
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
    else:
        model.set_denoiser(frozen)
        try:
            yield
        finally:
            model.set_denoiser(net)


def train_rl(config: RLConfig, hooks: Any = None) -> RunSummary:
    """Run (or resume) MSGRPO as configured (see the module docstring)."""
    model, source = start_run(config)
    rewards = build_reward_source(config.reward)
    rl = config.rl
    frozen = None
    if rl.kl_coef > 0 and not config.model.lora.enabled:
        frozen = copy.deepcopy(model.denoiser()).requires_grad_(False).eval()
    rt = Runtime(config, model, lambda: {})
    start, _ = rt.resume()
    if rl.prompts_per_step % rt.world:
        from uniref.errors import ConfigError

        raise ConfigError(f"rl.prompts_per_step {rl.prompts_per_step} is not divisible by {rt.world} processes")
    observer = Observer(config, rt)
    target_budget = rl.target_budget or rl.budget
    total = config.train.max_steps
    losses: list[float] = []
    bar = tqdm(
        range(start, total), initial=start, total=total, desc="msgrpo", disable=not (rt.is_main and config.log.progress)
    )
    step = start
    with rt.stop_on_signals():
        for step in bar:
            tick = time.perf_counter()
            # Prompts of this step: global indices step·P .. step·P + P − 1, split across processes.
            per_rank = rl.prompts_per_step // rt.world
            indices = [step * rl.prompts_per_step + rt.rank * per_rank + p for p in range(per_rank)]
            prompts = [source.sample(i) for i in indices]
            samples = [s for s in prompts for _ in range(rl.group_size)]
            groups = [i for i in indices for _ in range(rl.group_size)]
            seeds = [noise_seed(config.run.seed, i * rl.group_size + g) for i in indices for g in range(rl.group_size)]
            with rt.sampling_model(ema=False) as sampler:
                ro = rollout(EditPipeline(sampler), samples, rl, seeds, window_seed=noise_seed(config.run.seed, step))
                latents = [seq.target_latent(x) for seq, x in zip(ro.prepared.sequences, ro.final, strict=True)]
                images = EditPipeline(sampler).decode(latents)
            sample_seconds = time.perf_counter() - tick
            scores = [with_overall(x) for x in rewards.score(samples, images)]
            advantages_by = functools.partial(
                compute_advantages,
                scores,
                groups,
                weights=rl.weights,
                tau=rl.tau,
                renormalize=rl.renormalize,
                clip=rl.adv_clip,
            )
            adv = advantages_by(rl.aggregator)
            with rt.accelerator.autocast():
                total_loss = torch.zeros(())
                stats: dict[str, float] = {"ratio_mean": 0.0, "clip_fraction": 0.0, "kl": 0.0}
                for j in range(len(ro.window)):
                    logp, means, stds = policy_log_probs(model, ro, j, rl.noise_level)
                    kl = None
                    if rl.kl_coef > 0:
                        with torch.no_grad(), reference_policy(model, frozen):
                            _, ref_means, _ = policy_log_probs(model, ro, j, rl.noise_level)
                        kl = torch.cat(
                            [kl_to_reference(m, r, s) for m, r, s in zip(means, ref_means, stds, strict=True)]
                        )
                    out = clipped_policy_loss(
                        logp,
                        ro.old_log_prob[j],
                        adv.advantages.to(logp.device),
                        clip_range=rl.clip_range,
                        mask=adv.valid.to(logp.device),
                        kl=kl,
                        kl_coef=rl.kl_coef,
                    )
                    total_loss = total_loss + out.loss / len(ro.window)
                    stats["ratio_mean"] += float(out.ratio_mean) / len(ro.window)
                    stats["clip_fraction"] += float(out.clip_fraction) / len(ro.window)
                    stats["kl"] += float(out.kl) / len(ro.window) if out.kl is not None else 0.0
            update = rt.optimizer_step(total_loss)
            losses.append(float(rt.mean_across(total_loss)))
            if rt.is_main and (step + 1) % config.log.log_every == 0:
                scalars = {"loss": losses[-1], **stats, **_reward_scalars(scores), "dropped": adv.dropped}
                scalars |= {"adv_abs_mean": float(adv.advantages.abs().mean()), "sample_seconds": sample_seconds}
                scalars["ref_conflict"] = ref_conflict_fraction(adv.table)
                if rl.aggregator != "raw_sum":  # how far this aggregator's update is from Flow-GRPO's summed one
                    summed = advantages_by("raw_sum").advantages
                    agreement = advantage_agreement(adv.advantages, summed, adv.valid)
                    if agreement is not None:
                        scalars["adv_agreement_raw_sum"] = agreement
                scalars["step_seconds"] = time.perf_counter() - tick
                scalars.update(update or {})
                rt.log(step + 1, scalars)
                bar.set_postfix(worst_ref=f"{scalars.get('reward/worst_ref', float('nan')):.3f}")
            done = step + 1
            observer.after_step(done, rl.budget, target_budget, final=done == total)
            if rt.end_step(done, total, hooks):
                break
    interrupted = rt.finish()
    return RunSummary(step + 1 if losses else start, losses, rt.skipped_nonfinite, interrupted)


def _reward_scalars(scores: Sequence[dict[str, float] | None]) -> dict[str, float]:
    """Mean reward by source over scored samples, with the mean and worst reference per sample."""
    ok = [s for s in scores if s is not None]
    if not ok:
        return {}
    out: dict[str, float] = {}
    for key in ("overall", "instruction", "quality"):
        values = [s[key] for s in ok if key in s]
        if values:
            out[f"reward/{key}"] = sum(values) / len(values)
    refs = [[v for k, v in s.items() if k.startswith("ref_")] for s in ok]
    refs = [r for r in refs if r]
    if refs:
        out["reward/ref_mean"] = sum(sum(r) / len(r) for r in refs) / len(refs)
        out["reward/worst_ref"] = sum(min(r) for r in refs) / len(refs)
    return out
