"""From samples to a packed, noised training batch, and the flow-matching loss on target tokens.

For each sample: references are planned jointly under the stage's budget (SELF), the target under
its own; all images are encoded in one adapter call; the target latent is noised,
``x_t = (1 − σ)·x_0 + σ·ε`` with σ logit-normal and shifted for the target's token count, and
serialized before its clean references. The loss is the MSE between the predicted and the true
velocity ``ε − x_0`` on target tokens only, averaged per sample so that every sample weighs the
same whatever its size. Scene samples also carry their routes and object tokens
(:mod:`uniref.train.routing`): ``loss.routing`` teaches object tokens to read their own reference,
``loss.object_weight`` weighs object tokens up in the flow-matching mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniref import flow
from uniref.budget import Size, joint_budget, plan, plan_target
from uniref.data.sample import Sample
from uniref.errors import ConfigError
from uniref.images import image_size, resize, to_tensor
from uniref.models.base import DEFAULT_NEGATIVE, Conditioning, EditModel
from uniref.sequence import PackedBatch, build_sequence, pack_sequences, patchify
from uniref.train.routing import Route, RoutingLoss, object_token_mask, sample_routes


@dataclass
class TrainBatch:
    packed: PackedBatch
    sigma: torch.Tensor  # (B,)
    target_v: list[torch.Tensor]  # per sample (L_target_i, D): ε − x_0 as tokens
    instructions: list[str]
    refs: list[list]  # original PIL references per sample
    ref_sizes: list[list[Size]]
    tasks: list[str]
    ks: list[int]
    routes: list[list[Route]]  # per sample, objects' and background's (empty without a scene spec)
    object_masks: list[torch.Tensor | None]  # per sample (L_target_i,) bool: tokens objects cover

    @property
    def real_tokens(self) -> int:
        return int((self.packed.sample_ids >= 0).sum())


def training_shift(model: EditModel, target_tokens: int) -> float:
    """The resolution shift of the model's schedule for a target of ``target_tokens`` tokens."""
    spec = model.spec.schedule
    return math.exp(flow.calculate_shift(target_tokens, spec)) if spec.dynamic_shift else spec.shift


def make_batch(
    model: EditModel,
    samples: Sequence[Sample],
    ref_budget: int,
    target_budget: int,
    noise_seeds: Sequence[int],
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    instruction_dropout: float = 0.0,
    ref_floor: int = 0,
) -> TrainBatch:
    """Plan, encode, noise and pack ``samples``. Sample i's σ and ε come from a generator seeded with
    ``noise_seeds[i]`` alone, so they do not depend on the batch, the process or a resume. With
    ``instruction_dropout`` p, that generator also replaces a sample's instruction by the negative
    prompt with probability p (its references stay), which is what true CFG contrasts with.
    ``ref_floor`` (pixels) raises a sample's joint reference budget to K · ref_floor when that is more
    (:func:`uniref.budget.joint_budget`)."""
    spec = model.spec
    ref_plans = [
        plan([image_size(r) for r in s.refs], joint_budget(ref_budget, s.k, ref_floor), spec.plan_multiple)
        for s in samples
    ]
    targets = [plan_target(target_budget, spec.plan_multiple, like=image_size(s.target)) for s in samples]
    images = [
        to_tensor(resize(r, size))
        for s, p in zip(samples, ref_plans, strict=True)
        for r, size in zip(s.refs, p.sizes, strict=True)
    ]
    images += [to_tensor(resize(s.target, t)) for s, t in zip(samples, targets, strict=True)]
    with torch.no_grad():  # the codec is frozen (exact for tiny, the VAE for Qwen)
        latents = model.encode_images(images)
    ref_lat, target_lat = latents[: -len(samples)], latents[-len(samples) :]

    sequences, target_v, sigmas, instructions = [], [], [], []
    offset = 0
    for s, x_0, seed in zip(samples, target_lat, noise_seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        k = len(s.refs)
        tokens = (x_0.shape[1] // spec.patch_size) * (x_0.shape[2] // spec.patch_size)
        sigma = flow.sample_training_sigmas(
            1, training_shift(model, tokens), generator, logit_mean=logit_mean, logit_std=logit_std
        )
        noise = torch.randn(x_0.shape, generator=generator, dtype=torch.float32).to(x_0.device, x_0.dtype)
        x_t = flow.add_noise(x_0, noise, float(sigma))
        dropped = float(torch.rand(1, generator=generator)) < instruction_dropout
        instructions.append(DEFAULT_NEGATIVE if dropped else s.instruction)
        sequences.append(build_sequence(x_t, ref_lat[offset : offset + k], spec.patch_size, spec.centred_positions))
        target_v.append(patchify(flow.velocity_target(x_0, noise), spec.patch_size))
        sigmas.append(sigma)
        offset += k
    return TrainBatch(
        packed=pack_sequences(sequences),
        sigma=torch.cat(sigmas),
        target_v=target_v,
        instructions=instructions,
        refs=[list(s.refs) for s in samples],
        ref_sizes=[list(p.sizes) for p in ref_plans],
        tasks=[s.task for s in samples],
        ks=[len(s.refs) for s in samples],
        routes=[sample_routes(s.spec, seq.grids, background=True) for s, seq in zip(samples, sequences, strict=True)],
        object_masks=[object_token_mask(s.spec, seq.grids[0]) for s, seq in zip(samples, sequences, strict=True)],
    )


@dataclass
class LossParts:
    total: torch.Tensor  # what the optimizer minimises
    per_sample: torch.Tensor  # (B,) flow-matching loss of each sample, detached, for logging
    routing: torch.Tensor | None  # the routing term (before its weight), when on


def flow_loss(
    model: EditModel,
    batch: TrainBatch,
    cond: Conditioning,
    weighting: str = "flow",
    object_weight: float = 0.0,
    routing: float = 0.0,
    route_background: bool = False,
) -> LossParts:
    """Mean loss over samples, plus ``routing`` times the routing loss (of the placed objects, and of
    the background too with ``route_background``).

    ``flow``: ``mean‖v̂ − (ε − x_0)‖²``; ``x0``: the same times σ², which is the MSE of the implied
    clean estimate ``x̂_0 = x_t − σ·v̂`` (the natural loss of an x̂_0-predicting model). With
    ``object_weight`` w, a token that an object covers counts 1 + w times in its sample's mean.
    """
    hook = contextlib.nullcontext()
    router = None
    if routing > 0:
        attach = getattr(model, "attention_hook", None)
        if attach is None:
            raise ConfigError(f"loss.routing: the {type(model).__name__} adapter does not expose its attention")
        routes = [[r for r in rs if route_background or not r.background] for rs in batch.routes]
        router = RoutingLoss(routes, batch.packed)
        hook = attach(router)
    with hook:
        v_hat = batch.packed.target_tokens(model.velocity(batch.packed, cond, batch.sigma))
    losses = []
    for vh, vt, objects in zip(v_hat, batch.target_v, batch.object_masks, strict=True):
        err = (vh.float() - vt.to(vh.device).float()).pow(2).mean(-1)
        if object_weight and objects is not None:
            weights = 1.0 + object_weight * objects.to(err.device).float()
            losses.append((err * weights).sum() / weights.sum())
        else:
            losses.append(err.mean())
    per_sample = torch.stack(losses)
    if weighting == "x0":
        per_sample = per_sample * batch.sigma.to(per_sample.device).float() ** 2
    total = per_sample.mean()
    route = router.loss if router is not None else None
    if route is not None:
        total = total + routing * route
    return LossParts(total, per_sample.detach(), None if route is None else route.detach())
