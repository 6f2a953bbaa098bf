"""The model adapter protocol: everything UniRef needs from a model, and nothing more.

SELF, flow sampling, the pipeline, SFT and MSGRPO are written once against :class:`EditModel`; the
tiny CPU model and Qwen-Image-Edit-2509/2511 implement it. An adapter:

* declares its latent geometry (:class:`LatentSpec`): channels, pixels per latent cell, patch size,
  the multiple sizes are planned to, its native budgets, and its sigma-schedule settings;
* encodes instructions (+ the references, for models whose text encoder sees images) into
  per-sample conditioning;
* encodes images to normalised latents and decodes latents to images;
* predicts the velocity ``v = ε − x_0`` of every token of a packed SELF batch at noise level σ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from uniref.budget import Size, joint_budget
from uniref.errors import ModelError
from uniref.flow import ScheduleSpec  # the schedule's parameters are flow's own type; adapters fill them in
from uniref.sequence import PackedBatch

__all__ = [
    "AUTO_DTYPE",
    "DEFAULT_NEGATIVE",
    "DTYPES",
    "Conditioning",
    "EditModel",
    "LatentSpec",
    "ScheduleSpec",
    "resolve_dtype",
]

AUTO_DTYPE = "auto"
# Qwen-Image's examples use a single space as the negative prompt; trainers drop instructions to it.
DEFAULT_NEGATIVE = " "
# Names every entry point (CLI, Python, server) accepts for a weights dtype, besides "auto".
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The one dtype rule: ``auto`` is bf16 on a CUDA device that supports it and fp32 elsewhere
    (bf16 matmuls on CPU are emulated: two K = 1 edits of the tiny random Qwen components did not
    finish in 24 min in bf16 against 34 s each in fp32); a name of :data:`DTYPES` or a torch dtype
    is taken as given. ``device`` None means the Qwen loaders' default, cuda when available."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO_DTYPE:
        target = torch.device(device) if device is not None else None
        cuda = target.type == "cuda" if target is not None else torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class LatentSpec:
    """Latent geometry and native budgets of a model."""

    latent_channels: int
    vae_scale: int  # pixels per latent cell side
    patch_size: int  # latent cells per token side
    plan_multiple: int  # planned image sides are multiples of this many pixels
    ref_budget: int  # native pixel budget for all references together (SELF)
    target_budget: int  # native pixel budget of the output
    centred_positions: bool = True  # diffusers' scale_rope
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    # Pixels every reference gets at least: the joint budget of K references is
    # max(ref_budget, K · ref_floor). 0 keeps SELF's flat budget; > 0 gives many-reference requests
    # more tokens while one or two references stay on the output's own grid.
    ref_floor: int = 0

    @property
    def token_pixels(self) -> int:
        return self.vae_scale * self.patch_size

    def joint_ref_budget(self, k: int) -> int:
        """The native pixel budget for ``k`` references together."""
        return joint_budget(self.ref_budget, k, self.ref_floor)


@dataclass
class Conditioning:
    """Per-sample conditioning from the text (or vision-language) encoder."""

    txt: list[torch.Tensor]  # per sample: (L_txt_i, D_txt)

    def __len__(self) -> int:
        return len(self.txt)

    def select(self, indices: Sequence[int]) -> Conditioning:
        return Conditioning([self.txt[i] for i in indices])


class EditModel(ABC):
    """A multi-reference editing model behind one interface (see the module docstring)."""

    name: str
    spec: LatentSpec
    #: True for Qwen-Image-Edit-2511: reference tokens are modulated with timestep 0.
    zero_cond_t: bool = False
    #: Sampling defaults used when the caller gives none (Qwen-Image-Edit's model card values).
    default_steps: int = 28
    default_guidance: float = 4.0
    #: The sampler's SDE noise level (0: Euler ODE steps, the diffusers pipelines' sampler).
    default_noise_level: float = 0.0

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def encode_condition(
        self,
        instructions: Sequence[str],
        refs: Sequence[Sequence[Image.Image]],
        ref_sizes: Sequence[Sequence[Size]],
    ) -> Conditioning:
        """Encode each sample's instruction; ``refs`` are the original RGB references and
        ``ref_sizes`` their planned SELF sizes, for encoders that also look at the images."""

    @abstractmethod
    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Images (3, H, W) in [-1, 1] -> normalised latents (C, H/vae_scale, W/vae_scale)."""

    @abstractmethod
    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised latents (C, h, w) -> images (3, h·vae_scale, w·vae_scale) in [-1, 1]."""

    @abstractmethod
    def velocity(self, batch: PackedBatch, cond: Conditioning, sigma: torch.Tensor) -> torch.Tensor:
        """Velocity for every token of ``batch`` (R, C, D), given each sample's σ (B,).

        Only target tokens are used by callers (``batch.target_tokens(v)``)."""

    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The trainable network (SFT, MSGRPO and LoRA wrap this module)."""

    @abstractmethod
    def set_denoiser(self, module: torch.nn.Module) -> None:
        """Use ``module`` (the denoiser wrapped by DDP/FSDP or peft) for every later call."""
