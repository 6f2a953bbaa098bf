"""EditPipeline: instruction + K references -> edited image, for any :class:`EditModel`.

One call serves a batch of requests with different K and sizes:

1. plan sizes (``uniref.budget``): references under one budget (``global``, SELF) or each under its
   own (``per_image``, diffusers); the target under its own budget, from ``size`` or the aspect of
   the last reference;
2. encode each instruction (+ references) and, for true CFG, each negative prompt;
3. VAE-encode the resized references; draw each sample's noise from its own seed, in the element
   order of diffusers' ``randn_tensor((1, 1, C, h, w))`` so a seed means the same noise in both;
4. build one SELF sequence per sample, pack them into rows (``pack_sequences``) and integrate the
   flow ODE with Euler steps on each sample's own sigma schedule (it depends on its token count);
5. decode the target latents.

Request ``i`` of a batch given ``seed=s`` uses seed ``s + i``, so it equals the request run alone
with that seed. True CFG (as diffusers, with norm rescale) runs when ``guidance > 1``; unlike
diffusers it does not also require a negative prompt: the default negative is Qwen's ``" "``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from uniref import flow
from uniref.budget import Plan, PlanMode, Size, parse_budget, plan, plan_target
from uniref.images import image_size, resize, to_pil, to_tensor
from uniref.models import load_model
from uniref.models.base import AUTO_DTYPE, DEFAULT_NEGATIVE, Conditioning, EditModel, resolve_dtype
from uniref.sequence import PackedBatch, SelfSequence, build_sequence, pack_sequences

# The SDE sampler's noise for a request of seed s comes from seed s + this: not the initial noise's stream.
SAMPLER_SEED_OFFSET = 1_000_003

# (step index, sigma (B,), per-sample target tokens, per-sample guided velocities)
StepCallback = Callable[[int, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], None]


@dataclass
class Timings:
    """Wall seconds of each stage of the last call (``load`` is from ``from_pretrained``)."""

    load: float = 0.0
    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.encode + self.denoise + self.decode

    def as_dict(self) -> dict[str, float]:
        return {
            "load": self.load,
            "encode": self.encode,
            "denoise": self.denoise,
            "decode": self.decode,
            "total": self.total,
        }


@dataclass
class EditResult:
    """Everything one call produced, per request."""

    images: list[Image.Image]
    latents: list[torch.Tensor]  # per request: final target latent (C, h, w)
    ref_plans: list[Plan]
    target_sizes: list[Size]
    sigmas: list[torch.Tensor]  # per request: the (steps + 1,) schedule used
    timings: Timings = field(default_factory=Timings)


@dataclass
class Prepared:
    """A batch ready to denoise: one SELF sequence per request (target tokens are the initial noise)."""

    sequences: list[SelfSequence]
    cond: Conditioning
    neg_cond: Conditioning | None  # None when guidance is off
    ref_plans: list[Plan]
    targets: list[Size]
    schedules: list[torch.Tensor]  # per request (steps + 1,)
    guidance: float
    # The stochastic sampler's noise level (0: the Euler ODE) and each request's seed, which also
    # seeds that request's sampler noise so that a request's output never depends on its batch.
    noise_level: float = 0.0
    seeds: list[int] = field(default_factory=list)


class EditPipeline:
    """Multi-reference editing with any :class:`EditModel` (see the module docstring)."""

    def __init__(self, model: EditModel, *, load_seconds: float = 0.0) -> None:
        self.model = model
        self.load_seconds = load_seconds
        self.last_result: EditResult | None = None
        self.last_packing: list[list[int]] = []  # sample indices per packed row of the last call

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "tiny", *, dtype: str | torch.dtype = AUTO_DTYPE, **kwargs: Any
    ) -> EditPipeline:
        """A pipeline over ``uniref.models.load_model(name_or_path, **kwargs)``, in ``dtype``: ``auto``
        (default: bf16 on a CUDA device that has it, fp32 elsewhere), a name or a torch dtype
        (:func:`uniref.models.base.resolve_dtype`, the rule of every entry point)."""
        start = time.perf_counter()
        if dtype != AUTO_DTYPE or kwargs.get("device") is not None:
            kwargs["dtype"] = resolve_dtype(dtype, kwargs.get("device"))
        # else: "auto" without a device is left to the loader, which knows where it puts the model
        # (the tiny flavours on the CPU in fp32; the Qwen loaders resolve "auto" for their device).
        model = load_model(name_or_path, **kwargs)
        return cls(model, load_seconds=time.perf_counter() - start)

    @property
    def last_timings(self) -> Timings | None:
        return None if self.last_result is None else self.last_result.timings

    @property
    def last_latents(self) -> list[torch.Tensor] | None:
        return None if self.last_result is None else self.last_result.latents

    def plan_sizes(
        self,
        refs: Sequence[Image.Image],
        *,
        size: Size | None = None,
        budget: int | str | None = None,
        target_budget: int | str | None = None,
        mode: PlanMode | str = PlanMode.GLOBAL,
        like: Size | None = None,
    ) -> tuple[Plan, Size]:
        """Reference plan and target size of one request (the only sizes the pipeline uses).

        The target is ``size`` if given, else the best size under the target budget with the aspect
        of ``like`` (default: the last reference, as diffusers)."""
        spec = self.model.spec
        ref_budget = parse_budget(budget) if budget is not None else spec.joint_ref_budget(len(refs))
        out_budget = parse_budget(target_budget) if target_budget is not None else spec.target_budget
        ref_plan = plan([image_size(r) for r in refs], ref_budget, spec.plan_multiple, mode)
        like = like or image_size(refs[-1])
        target = plan_target(out_budget, spec.plan_multiple, size=size, like=like, mode=mode)
        return ref_plan, target

    @torch.no_grad()
    def __call__(
        self,
        instruction: str | Sequence[str],
        refs: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
        size: Size | Sequence[Size | None] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative: str | Sequence[str] | None = None,
        seed: int | Sequence[int] = 0,
        budget: int | str | None = None,
        target_budget: int | str | None = None,
        mode: PlanMode | str = PlanMode.GLOBAL,
        progress: bool = True,
    ) -> list[Image.Image]:
        """Edit one request (``instruction: str``, ``refs: [img, ...]``) or a batch (lists of
        both, plus optionally per-request ``size``, ``negative`` and ``seed``). Returns one image per
        request; latents, plans and timings of the call are in :attr:`last_result`. ``steps`` and
        ``guidance`` default to the model's own (``default_steps``, ``default_guidance``); true CFG
        runs when ``guidance > 1``."""
        return self.generate(
            instruction,
            refs,
            size,
            steps=steps,
            guidance=guidance,
            negative=negative,
            seed=seed,
            budget=budget,
            target_budget=target_budget,
            mode=mode,
            progress=progress,
        ).images

    @torch.no_grad()
    def generate(
        self,
        instruction: str | Sequence[str],
        refs: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
        size: Size | Sequence[Size | None] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative: str | Sequence[str] | None = None,
        seed: int | Sequence[int] = 0,
        budget: int | str | None = None,
        target_budget: int | str | None = None,
        mode: PlanMode | str = PlanMode.GLOBAL,
        progress: bool = True,
        decode: bool = True,
        capacity: int | None = None,
        target_like: Size | Sequence[Size | None] | None = None,
        on_step: StepCallback | None = None,
        noise_level: float | None = None,
    ) -> EditResult:
        """As ``__call__``, returning the full :class:`EditResult` (``decode=False`` skips the VAE;
        ``capacity`` is the packed row length in tokens, default the longest sample; ``target_like``
        gives each output the aspect of this size at the target budget, e.g. a ground-truth target's).
        ``on_step(i, sigma, xs, velocities)`` sees every sampler step before its Euler update, like
        diffusers' ``callback_on_step_end``: ``sigma`` (B,), per sample the target tokens and the
        (guided) velocity; x̂0 = x - sigma * v. It must not modify them. ``noise_level`` > 0 samples
        with the SDE that shares the ODE's marginals (:func:`uniref.flow.sde_step`, Flow-GRPO's) instead
        of Euler steps; default: the model's ``default_noise_level``."""
        timings = Timings(load=self.load_seconds)
        start = time.perf_counter()
        prep = self.prepare(
            instruction,
            refs,
            size,
            steps=steps,
            guidance=guidance,
            negative=negative,
            seed=seed,
            budget=budget,
            target_budget=target_budget,
            mode=mode,
            target_like=target_like,
            noise_level=noise_level,
        )
        timings.encode = time.perf_counter() - start

        start = time.perf_counter()
        final = self.denoise(prep, progress=progress, capacity=capacity, on_step=on_step)
        latents = [seq.target_latent(x) for seq, x in zip(prep.sequences, final, strict=True)]  # each (C, h, w)
        timings.denoise = time.perf_counter() - start

        images: list[Image.Image] = []
        if decode:
            start = time.perf_counter()
            images = self.decode(latents)
            timings.decode = time.perf_counter() - start
        self.last_result = EditResult(images, latents, prep.ref_plans, prep.targets, prep.schedules, timings)
        return self.last_result

    def prepare(
        self,
        instruction: str | Sequence[str],
        refs: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
        size: Size | Sequence[Size | None] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative: str | Sequence[str] | None = None,
        seed: int | Sequence[int] = 0,
        budget: int | str | None = None,
        target_budget: int | str | None = None,
        mode: PlanMode | str = PlanMode.GLOBAL,
        target_like: Size | Sequence[Size | None] | None = None,
        noise_level: float | None = None,
    ) -> Prepared:
        """Everything before denoising (sizes, conditioning, reference latents, noise, SELF sequences,
        schedules), for samplers of their own such as MSGRPO's SDE rollouts."""
        instructions, ref_lists, sizes, negatives, seeds = _normalise_batch(instruction, refs, size, negative, seed)
        likes = _per_request(target_like, len(instructions), "target_like", single=Size)
        model = self.model
        steps = model.default_steps if steps is None else steps
        guidance = model.default_guidance if guidance is None else guidance
        noise_level = model.default_noise_level if noise_level is None else noise_level
        if not noise_level >= 0:
            raise ValueError(f"noise_level={noise_level}: must be 0 (the ODE) or more")
        planned = [
            self.plan_sizes(r, size=s, budget=budget, target_budget=target_budget, mode=mode, like=lk)
            for r, s, lk in zip(ref_lists, sizes, likes, strict=True)
        ]
        ref_plans = [p for p, _ in planned]
        targets = [t for _, t in planned]
        ref_sizes = [list(p.sizes) for p in ref_plans]
        cond = model.encode_condition(instructions, ref_lists, ref_sizes)
        neg_cond = model.encode_condition(negatives, ref_lists, ref_sizes) if guidance > 1.0 else None
        ref_latents = self._encode_refs(ref_lists, ref_sizes)
        sequences = [
            build_sequence(self._noise(target, s), lats, model.spec.patch_size, model.spec.centred_positions)
            for target, s, lats in zip(targets, seeds, ref_latents, strict=True)
        ]
        schedules = [flow.sigmas(steps, seq.num_target_tokens, model.spec.schedule) for seq in sequences]
        return Prepared(sequences, cond, neg_cond, ref_plans, targets, schedules, guidance, noise_level, list(seeds))

    def denoise(
        self,
        prep: Prepared,
        *,
        progress: bool = False,
        capacity: int | None = None,
        on_step: StepCallback | None = None,
    ) -> list[torch.Tensor]:
        """Run the sampler on a prepared batch from its sequences' target tokens along its schedules
        (equal lengths); per request the final target tokens (L_target_i, D). A caller may first put
        other start tokens and a shortened schedule in ``prep`` (SDEdit-style: start from an image
        re-noised to σ₀ and integrate from σ₀)."""
        return self._denoise(
            prep.sequences,
            prep.cond,
            prep.neg_cond,
            prep.schedules,
            prep.guidance,
            progress,
            capacity,
            on_step,
            noise_level=prep.noise_level,
            seeds=prep.seeds,
        )

    def decode(self, latents: Sequence[torch.Tensor]) -> list[Image.Image]:
        """Target latents (C, h, w) -> PIL images."""
        return [to_pil(img) for img in self.model.decode_latents(latents)]

    # --- stages -------------------------------------------------------------------------------

    def _encode_refs(
        self, ref_lists: Sequence[Sequence[Image.Image]], ref_sizes: Sequence[Sequence[Size]]
    ) -> list[list[torch.Tensor]]:
        """Resize every reference to its planned size and encode all of them in one adapter call."""
        flat = [
            to_tensor(resize(img, s)).to(self.model.device, self.model.dtype)
            for imgs, sizes in zip(ref_lists, ref_sizes, strict=True)
            for img, s in zip(imgs, sizes, strict=True)
        ]
        encoded = iter(self.model.encode_images(flat))
        return [[next(encoded) for _ in imgs] for imgs in ref_lists]

    def _noise(self, target: Size, seed: int) -> torch.Tensor:
        """(C, h, w) noise for a target, drawn on the CPU as diffusers' randn_tensor((1, 1, C, h, w))."""
        spec = self.model.spec
        shape = (1, 1, spec.latent_channels, target.height // spec.vae_scale, target.width // spec.vae_scale)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=gen, dtype=self.model.dtype)
        return noise[0, 0].to(self.model.device)

    def _denoise(
        self,
        sequences: list[SelfSequence],
        cond: Conditioning,
        neg_cond: Conditioning | None,
        schedules: list[torch.Tensor],
        guidance: float,
        progress: bool,
        capacity: int | None,
        on_step: StepCallback | None = None,
        *,
        noise_level: float = 0.0,
        seeds: Sequence[int] = (),
    ) -> list[torch.Tensor]:
        """Euler-integrate every sample's target tokens, or with ``noise_level`` > 0 take SDE steps
        (the last step stays Euler, so no fresh noise is left in the output); references stay clean.
        Returns per sample the final target tokens (L_target_i, D)."""
        batch = pack_for_denoising(sequences, cond, neg_cond, capacity)
        self.last_packing = batch.rows
        xs = [seq.tokens[: seq.num_target_tokens].clone() for seq in sequences]  # each (L_t, D)
        steps = len(schedules[0]) - 1
        if noise_level > 0 and len(seeds) != len(sequences):
            raise ValueError(f"noise_level={noise_level} needs one seed per request ({len(sequences)})")
        generators = [torch.Generator().manual_seed(SAMPLER_SEED_OFFSET + s) for s in seeds]
        with condition_cache(self.model):
            for i in tqdm(range(steps), desc="denoise", disable=not progress, leave=False):
                sigma = torch.stack([s[i] for s in schedules])  # (B,)
                v = target_velocity(self.model, batch, xs, cond, neg_cond, sigma, guidance)
                if on_step is not None:
                    on_step(i, sigma, xs, v)
                if noise_level > 0 and i < steps - 1:
                    xs = [
                        flow.sde_step(x, vi, s[i].float(), s[i + 1].float(), noise_level, noise=_draw(g, x)).x_next.to(
                            x.dtype
                        )
                        for x, vi, s, g in zip(xs, v, schedules, generators, strict=True)
                    ]
                else:
                    xs = [
                        flow.euler_step(x, vi, s[i].float(), s[i + 1].float())
                        for x, vi, s in zip(xs, v, schedules, strict=True)
                    ]
        return xs


def _draw(generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped as ``like``, drawn on the CPU (as the initial noise) and moved."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def condition_cache(model: EditModel) -> contextlib.AbstractContextManager[Any]:
    """The model's per-request condition key/value cache for one sampling loop (Qwen-Image-2.1:
    text and reference keys/values computed at the first step and reused), or a no-op for models
    without one. Only the sampler enters it: training forwards always recompute everything."""
    enter = getattr(model, "condition_cache", None)
    return enter() if enter is not None else contextlib.nullcontext()


def pack_for_denoising(
    sequences: Sequence[SelfSequence], cond: Conditioning, neg_cond: Conditioning | None, capacity: int | None = None
) -> PackedBatch:
    """Pack SELF sequences into rows, leaving room for the longer of each sample's two prompts."""
    txt_lens = [max(c.shape[0] for c in pair) for pair in zip(cond.txt, (neg_cond or cond).txt, strict=True)]
    return pack_sequences(sequences, capacity, extra_lengths=txt_lens)


def target_velocity(
    model: EditModel,
    batch: PackedBatch,
    xs: Sequence[torch.Tensor],
    cond: Conditioning,
    neg_cond: Conditioning | None,
    sigma: torch.Tensor,
    guidance: float,
) -> list[torch.Tensor]:
    """Each sample's (guided) velocity at its current target tokens ``xs`` and noise level ``sigma`` (B,):
    the model's velocity, or true CFG with norm rescale when ``neg_cond`` is given."""
    batch = with_targets(batch, xs)
    sigma = sigma.to(model.device, torch.float32)
    v = batch.target_tokens(model.velocity(batch, cond, sigma))
    if neg_cond is None:
        return v
    v_neg = batch.target_tokens(model.velocity(batch, neg_cond, sigma))
    # Qwen-Image-Edit rescales the guided velocity to the conditional norm; Qwen-Image-2.1 does not.
    rescale = getattr(model, "cfg_norm_rescale", True)
    return [flow.true_cfg(c, u, guidance, rescale=rescale) for c, u in zip(v, v_neg, strict=True)]


def with_targets(batch: PackedBatch, xs: Sequence[torch.Tensor]) -> PackedBatch:
    """A copy of ``batch`` whose target spans hold ``xs`` (fresh token storage: a forward pass kept for
    backward must not see its input overwritten by the next step)."""
    values = batch.tokens.values.clone()  # (R, C, D)
    for x, (row, start, _) in zip(xs, batch.tokens.spans, strict=True):
        values[row, start : start + x.shape[0]] = x.to(values.dtype)
    return dataclasses.replace(batch, tokens=dataclasses.replace(batch.tokens, values=values))


def _normalise_batch(
    instruction: str | Sequence[str],
    refs: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
    size: Size | Sequence[Size | None] | None,
    negative: str | Sequence[str] | None,
    seed: int | Sequence[int],
) -> tuple[list[str], list[list[Image.Image]], list[Size | None], list[str], list[int]]:
    """One request or a batch -> per-request lists (see ``EditPipeline.__call__``)."""
    if isinstance(instruction, str):
        if not refs or not all(isinstance(r, Image.Image) for r in refs):
            raise ValueError("a single instruction takes a list of PIL reference images (K >= 1)")
        instructions, ref_lists = [instruction], [list(refs)]  # type: ignore[arg-type]
    else:
        instructions = list(instruction)
        ref_lists = [list(r) for r in refs]  # type: ignore[arg-type]
        if len(ref_lists) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(ref_lists)} reference lists")
        if not instructions:
            raise ValueError("empty batch: give at least one instruction")
        if any(not r for r in ref_lists):
            raise ValueError("every request needs at least one reference image (K >= 1)")
    n = len(instructions)
    sizes = _per_request(size, n, "size", single=Size)
    negatives = _per_request(negative if negative is not None else DEFAULT_NEGATIVE, n, "negative", single=str)
    seeds = list(range(seed, seed + n)) if isinstance(seed, int) else _per_request(seed, n, "seed", single=int)
    return instructions, ref_lists, sizes, negatives, seeds


def _per_request(value: Any, n: int, name: str, *, single: type) -> list[Any]:
    if value is None or isinstance(value, single):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} values of {name} for {n} requests")
    return values
