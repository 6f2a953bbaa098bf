"""Training configs (SFT now, MSGRPO later): typed sections shared by both trainers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from uniref.config import StrictModel, TrainingConfig


class LoraSection(StrictModel):
    enabled: bool = Field(False, description="train LoRA adapters instead of the full denoiser")
    rank: int = Field(64, ge=1)
    alpha: float = Field(128.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"],
        description="module names (peft matching) that get adapters",
    )


class ModelSection(StrictModel):
    name: str = Field("tiny-random", description="flavour (tiny, tiny-random, qwen-image-edit-2511) or folder")
    path: Path | None = Field(None, description="weights folder for a Qwen flavour")
    init_from: Path | None = Field(None, description="start from this checkpoint's weights (not its state)")
    tiny: dict[str, Any] = Field(default_factory=dict, description="TinyConfig overrides for tiny-random")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="weights dtype: auto = bf16 on a GPU that has it, fp32 on CPU (the rule of every entry point); "
        "bf16 autocast on CUDA either way",
    )
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False,
        description="torch.compile the denoiser's repeated blocks (inductor, shapes dynamic); the first steps "
        "pay the compile time, the math is the same",
    )
    lora: LoraSection = Field(default_factory=LoraSection)


class DataSection(StrictModel):
    source: str = Field("scenes", description="'scenes' (generated on the fly) or a dataset folder/manifest")
    task_mix: dict[str, float] = Field(
        default_factory=lambda: {"edit": 0.5, "compose": 0.5},
        description="task families or task names -> sampling weight; 'compose@2' caps that entry's K at 2",
    )
    max_refs: int = Field(6, ge=1, le=10)
    size_range: str = Field("48:160", description="generated image side range MIN:MAX (pixels)")
    seed_offset: int = Field(0, ge=0, description="first generator seed of this run's training stream")
    workers: int = Field(1, ge=0, description="processes generating/loading samples ahead of training (0: inline)")
    encode_in_workers: bool = Field(
        False,
        description="workers also plan, encode (frozen codec, text) and noise each batch: for CPU runs whose "
        "encoders are light (the tiny codec), so the trainer's cores only run the denoiser",
    )
    cache_dir: Path | None = Field(
        None, description="cache the frozen encoders' outputs (VAE latents, text conditioning) in this folder"
    )


class StageSection(StrictModel):
    """One stage of the progressive budget schedule."""

    budget: int = Field(..., gt=0, description="reference budget side: 64 means 64² pixels for all references")
    target_budget: int | None = Field(None, gt=0, description="output budget side (default: budget)")
    ref_floor: int | None = Field(
        None,
        gt=0,
        description="side of the pixels each reference gets at least: K references share max(budget², K·ref_floor²)",
    )
    steps: int = Field(..., gt=0, description="optimizer steps in this stage")
    batch_size: int = Field(..., gt=0, description="global batch size (samples per optimizer step)")
    lr_scale: float = Field(1.0, gt=0, description="multiplies the schedule's learning rate in this stage")
    warmup_steps: int = Field(0, ge=0, description="extra warm-up at the start of this stage")
    task_mix: dict[str, float] | None = Field(None, description="this stage's data.task_mix (a K curriculum)")
    max_refs: int | None = Field(None, ge=1, le=10, description="this stage's data.max_refs")

    def pixel_budgets(self) -> dict[str, int]:
        """``ref_budget``, ``target_budget`` and ``ref_floor`` in pixels (what batches and exports use)."""
        return {
            "ref_budget": self.budget**2,
            "target_budget": (self.target_budget or self.budget) ** 2,
            "ref_floor": (self.ref_floor or 0) ** 2,
        }


class OptimSection(StrictModel):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr·min_lr_ratio")
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 disables EMA")
    param_lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description="parameters whose name starts with a key train at lr × its value (first key that matches), "
        "e.g. {role_in: 10} for a layer grown at zero into trained weights",
    )


class LossSection(StrictModel):
    weighting: Literal["flow", "x0"] = Field(
        "flow", description="flow: MSE(v̂, ε − x0); x0: the same times σ² (MSE of x̂0, for x0-predicting models)"
    )
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    object_weight: float = Field(
        0.0, ge=0, description="scene samples: a target token an object covers counts 1 + this in the mean"
    )
    routing: float = Field(
        0.0, ge=0, description="weight of the routing loss (uniref.train.routing): object tokens read their source"
    )
    route_background: bool = Field(
        False, description="the routing loss also sends background tokens to the background picture (K >= 2)"
    )
    instruction_dropout: float = Field(
        0.0, ge=0, lt=1, description="share of samples trained on the negative prompt, so true CFG works"
    )


class LogSection(StrictModel):
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1, description="newest checkpoints kept; stage ends are kept as well")
    preview_every: int = Field(500, ge=1)
    val_every: int = Field(1000, ge=1)
    val_samples: int = Field(32, ge=0)
    val_steps: int = Field(20, ge=1, description="sampler steps for previews and validation")
    tensorboard: bool = True
    progress: bool = True


class SFTConfig(TrainingConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    stages: list[StageSection] = Field(
        default_factory=lambda: [StageSection(budget=64, steps=1000, batch_size=16)], min_length=1
    )
    optim: OptimSection = Field(default_factory=OptimSection)
    loss: LossSection = Field(default_factory=LossSection)
    log: LogSection = Field(default_factory=LogSection)

    def stage_at(self, step: int) -> tuple[int, StageSection]:
        """The stage that owns optimizer step ``step`` (0-based); the last stage runs on past its end."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def stage_start(self, index: int) -> int:
        return sum(s.steps for s in self.stages[:index])

    def stage_ends(self) -> list[int]:
        """The last step of every stage but the final one: the model as each stage leaves it, to be
        scored before the next stage widens the task (``log.keep_last`` never prunes them)."""
        return [self.stage_start(i) for i in range(1, len(self.stages))]

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``optim.lr`` at ``step``. The cosine spans the curriculum (the stages), not
        train.max_steps, so stopping early and rerunning with a larger max_steps follows exactly the
        schedule of one uninterrupted run."""
        index, stage = self.stage_at(step)
        start = self.stage_start(index)
        warm = warmup(step, self.optim.warmup_steps)
        if stage.warmup_steps:
            warm = min(warm, warmup(step - start, stage.warmup_steps))
        return stage.lr_scale * warm * cosine(step, self.stage_start(len(self.stages)), self.optim.min_lr_ratio)


def warmup(step: int, steps: int) -> float:
    """Linear warm-up: (step + 1) / steps, then 1."""
    return min(1.0, (step + 1) / steps) if steps else 1.0


def cosine(step: int, total: int, floor: float) -> float:
    """Cosine from 1 at step 0 to ``floor`` at ``total`` (and after)."""
    progress = min(1.0, step / max(1, total))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class RLSection(StrictModel):
    """MSGRPO sampling and objective (DESIGN §1-2; defaults scaled for the tiny model on CPU)."""

    prompts_per_step: int = Field(4, ge=1, description="prompts (instruction + references) per optimizer step")
    group_size: int = Field(8, ge=2, description="G: outputs sampled per prompt")
    sample_steps: int = Field(10, ge=2, description="T: sampler steps of a rollout")
    noise_level: float = Field(0.7, ge=0, description="a: SDE noise level")
    window: int = Field(3, ge=1, description="SDE (trained) steps per rollout; sample_steps - 1 = full trajectory")
    window_start: int | None = Field(None, ge=0, description="first SDE step; None draws it per rollout")
    guidance: float | None = Field(None, description="true-CFG scale in rollouts; None: the model's default")
    budget: int = Field(64, gt=0, description="reference budget side (64 means 64² pixels)")
    target_budget: int | None = Field(None, gt=0, description="output budget side (default: budget)")
    aggregator: Literal["reconcile", "weighted_sum", "raw_sum"] = "reconcile"
    weights: dict[str, float] = Field(
        default_factory=lambda: {"ref": 1.0, "instruction": 0.5, "quality": 0.25, "overall": 1.0},
        description="per source; 'ref' is shared by the per-reference sources; 'overall' is √(instruction · worst ref)",
    )
    tau: float = Field(0.05, gt=0, description="soft-min temperature of the reconcile aggregator")
    renormalize: bool = Field(False, description="GDPO: re-normalise the combined advantage in its group")
    adv_clip: float = Field(5.0, gt=0)
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip ε")
    kl_coef: float = Field(0.0, ge=0, description="β of the KL to the reference policy (the starting weights)")


class RewardSection(StrictModel):
    kind: Literal["scenes", "http", "judge"] = Field("scenes", description="exact metrics, a reward server, a VLM")
    url: str | None = Field(None, description="base URL of the reward server or OpenAI-compatible judge")
    judge_model: str | None = Field(None, description="model name for the judge")
    api_key_env: str = Field("UNIREF_JUDGE_API_KEY", description="environment variable holding the judge's key")
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)


class RLConfig(TrainingConfig):
    model: ModelSection = Field(default_factory=lambda: ModelSection(name="tiny"))
    data: DataSection = Field(
        default_factory=lambda: DataSection(task_mix={"compose": 0.5, "conflict": 0.3, "edit": 0.2}, max_refs=4)
    )
    rl: RLSection = Field(default_factory=RLSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-5, warmup_steps=0, ema_decay=0.0))
    log: LogSection = Field(default_factory=LogSection)

    def lr_factor(self, step: int) -> float:
        """Warm-up, then constant (Flow-GRPO)."""
        return warmup(step, self.optim.warmup_steps)
