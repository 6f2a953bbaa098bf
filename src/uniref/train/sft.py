"""SFT: flow matching on the target tokens of SELF sequences, with a progressive budget.

Each optimizer step takes a global batch of samples (edits and compositions mixed by
``data.task_mix``), plans every sample's K references jointly under the current stage's budget
(64² → 96² → 128² for tiny, 1024² → 1536² → 2048² for Qwen-Image-Edit), noises the target latent
``x_t = (1 − σ)·x_0 + σ·ε`` with σ = shift(sigmoid(u)), u ~ N(μ, s²), packs the samples' sequences
into rows and minimises ``‖v̂(x_t, refs, text, σ) − (ε − x_0)‖²`` on target tokens (``loss.weighting
= x0`` multiplies by σ², the MSE of x̂_0). AdamW, warm-up + cosine, gradient clipping, EMA;
checkpoints hold the full state and a rerun into the same folder resumes exactly.

    uniref train sft --config configs/tiny_sft.yaml train.max_steps=2000 run.output_dir=runs/tiny
    accelerate launch --num_processes 8 -m uniref train sft --config configs/qwen_image_edit_sft.yaml
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from uniref.errors import ConfigError
from uniref.models.base import Conditioning
from uniref.train.batch import TrainBatch, flow_loss, make_batch
from uniref.train.cache import with_cache
from uniref.train.config import SFTConfig
from uniref.train.data import StepBatches, step_loader
from uniref.train.observe import Observer
from uniref.train.runtime import Runtime, start_run


@dataclass
class RunSummary:
    steps: int  # optimizer steps completed in total
    losses: list[float]  # the loss of every step run in this call (mean across processes)
    skipped_nonfinite: int
    interrupted: bool


def train_sft(config: SFTConfig, hooks: Any = None) -> RunSummary:
    """Run (or resume) SFT as configured; ``hooks.after_step(step, runtime)`` is for previews."""
    model, source = start_run(config)
    rt = Runtime(config, model, lambda: {})
    start, _ = rt.resume()
    total = config.train.max_steps

    def batch_size_at(step: int) -> int:
        size = config.stage_at(step)[1].batch_size
        if size % rt.world:
            raise ConfigError(f"stages: batch_size {size} is not divisible by {rt.world} processes")
        return size

    batches = StepBatches(batch_size_at, start, total, rt.rank, rt.world)
    observer = Observer(config, rt)
    encoders = with_cache(model, config.data.cache_dir, f"{config.model.name}\0{config.model.path}")

    def prepare(
        indices: list[int], samples: list, autocast: Callable[[], Any] = contextlib.nullcontext
    ) -> tuple[TrainBatch, Conditioning]:
        """Plan, encode, noise and pack one step's samples (here or in a data worker); the VAE runs
        outside autocast, the text encoder inside it."""
        _, stage = config.stage_at(batches.step_of(indices[0]))
        budgets = stage.pixel_budgets()
        batch = make_batch(
            encoders,
            samples,
            budgets["ref_budget"],
            budgets["target_budget"],
            [noise_seed(config.run.seed, i) for i in indices],
            config.loss.logit_mean,
            config.loss.logit_std,
            config.loss.instruction_dropout,
            budgets["ref_floor"],
        )
        with autocast():
            return batch, encoders.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)

    in_workers = config.data.encode_in_workers and config.data.workers > 0
    if in_workers and model.device.type != "cpu":
        raise ConfigError("data.encode_in_workers: data workers encode on the CPU; turn it off on a GPU")
    loader = step_loader(source, batches, config.data.workers, prepare if in_workers else None)

    losses: list[float] = []
    bar = tqdm(
        range(start, total), initial=start, total=total, desc="sft", disable=not (rt.is_main and config.log.progress)
    )
    step = start
    with rt.stop_on_signals():
        for step in bar:
            index, stage = config.stage_at(step)
            tick = time.perf_counter()
            indices, samples, prepared = next(loader)
            batch, cond = prepared or prepare(indices, samples, rt.accelerator.autocast)
            with rt.accelerator.autocast():
                parts = flow_loss(
                    model,
                    batch,
                    cond,
                    config.loss.weighting,
                    config.loss.object_weight,
                    config.loss.routing,
                    config.loss.route_background,
                )
            stats = rt.optimizer_step(parts.total)
            per_sample = parts.per_sample
            mean_loss = float(rt.mean_across(parts.per_sample.mean()))
            losses.append(mean_loss)
            seconds = time.perf_counter() - tick
            if rt.is_main and (step + 1) % config.log.log_every == 0:
                scalars = {"loss": mean_loss, "stage": index, "budget": stage.budget}
                if parts.routing is not None:
                    scalars["loss/routing"] = float(rt.mean_across(parts.routing))
                scalars["tokens_per_s"] = batch.real_tokens * rt.world / seconds
                scalars["real_token_fraction"] = batch.packed.real_fraction
                scalars["skipped_nonfinite"] = rt.skipped_nonfinite
                scalars.update(stats or {})
                if encoders is not model:
                    scalars["cache_hit_fraction"] = encoders.cache.hit_fraction
                scalars.update(_grouped("loss/task", batch.tasks, per_sample))
                scalars.update(_grouped("loss/k", batch.ks, per_sample))
                rt.log(step + 1, scalars)
                bar.set_postfix(loss=f"{mean_loss:.4f}", stage=index)
            done = step + 1
            observer.after_step(done, stage.budget, stage.target_budget or stage.budget, final=done == total)
            if rt.end_step(done, total, hooks):
                break
    interrupted = rt.finish()
    return RunSummary(step + 1 if losses else start, losses, rt.skipped_nonfinite, interrupted)


def noise_seed(run_seed: int, sample_index: int) -> int:
    """The seed of one training sample's σ and ε: a function of the run seed and the sample's global
    index only (so DDP, batch composition and resume cannot change it)."""
    return (run_seed << 40) + sample_index


def _grouped(prefix: str, keys: list[Any], values: torch.Tensor) -> dict[str, float]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for key, value in zip(keys, values.tolist(), strict=True):
        groups[key].append(value)
    return {f"{prefix}/{key}": sum(v) / len(v) for key, v in groups.items()}
