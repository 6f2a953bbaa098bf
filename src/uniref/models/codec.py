"""A small frozen autoencoder for the tiny flavour: the scene world's analogue of Qwen-Image's VAE.

An image (3, H, W) in [-1, 1] becomes a latent (C, H/8, W/8), normalised per channel to zero mean and
unit variance (the statistics are measured on scene images after training, as diffusers' Qwen VAE
carries ``latents_mean`` / ``latents_std``). Why: predicting 192 raw pixels per token makes the tiny
denoiser spend its capacity on pixel noise and gives blocky outputs (issue 17, hypothesis 3); a few
latent channels per 8x8 cell leave it the layout, and the decoder draws sharp edges and patterns.

It is trained once on generated scenes (``uniref train codec``), then frozen: the denoiser's trainer
never sees its weights, and a tiny model folder carries them (keys ``codec.*``) so it loads alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from uniref.errors import ModelError
from uniref.images import atomic_path

CODEC_CONFIG = "codec.json"
CODEC_WEIGHTS = "codec.safetensors"
SHIPPED_CODEC = Path(__file__).resolve().parent.parent / "assets" / "codec"
CROPS_PER_IMAGE = 2  # rendering costs more than a training step: use each image twice
LR = 1e-3


@dataclass(frozen=True)
class CodecConfig:
    channels: int = 16  # latent channels per cell
    width: int = 16  # feature width of the first (full-resolution) level; doubles per level
    levels: int = 3  # each halves the resolution: factor 2**levels

    @property
    def factor(self) -> int:
        return 2**self.levels


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.gelu(self.a(F.gelu(x))))


class Codec(nn.Module):
    """Encoder: stride-2 convs + residual blocks; decoder: the mirror with nearest upsampling."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.levels + 1)]
        enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i in range(config.levels):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), _Res(widths[i + 1])]
        enc += [nn.GELU(), nn.Conv2d(widths[-1], config.channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.channels, widths[-1], 3, padding=1), _Res(widths[-1])]
        for i in reversed(range(config.levels)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1)]
            dec += [_Res(widths[i])]
        dec += [nn.GELU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("mean", torch.zeros(config.channels))
        self.register_buffer("std", torch.ones(config.channels))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], H and W multiples of the factor -> normalised (N, C, H/f, W/f)."""
        z = self.encoder(images)
        return (z - self.mean[:, None, None]) / self.std[:, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std[:, None, None] + self.mean[:, None, None]
        return self.decoder(z).clamp(-1, 1)


def save_codec(codec: Codec, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in codec.state_dict().items()}
    with atomic_path(folder / CODEC_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    with atomic_path(folder / CODEC_CONFIG) as tmp:
        tmp.write_text(json.dumps(asdict(codec.config), indent=1))
    return folder


def codec_from_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Codec:
    """A frozen codec from its config (``codec.json``'s object) and weights; raises TypeError,
    KeyError or RuntimeError when they do not fit (callers name the file)."""
    codec = Codec(CodecConfig(**config))
    codec.load_state_dict({k: v.float() for k, v in state.items()})
    return codec.eval().requires_grad_(False)


def load_codec(folder: str | Path) -> Codec:
    folder = Path(folder)
    try:
        return codec_from_state(json.loads((folder / CODEC_CONFIG).read_text()), load_file(str(folder / CODEC_WEIGHTS)))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{folder}: not a readable UniRef codec ({exc})") from None


def codec_folder(name: str) -> Path:
    """``scenes`` -> the shipped codec; anything else is a folder written by :func:`save_codec`."""
    return SHIPPED_CODEC if name == "scenes" else Path(name)


# --- training ---------------------------------------------------------------------------------------


def scene_crops(seed: int, n: int, side: int) -> torch.Tensor:
    """``n`` random ``side``² crops (N, 3, side, side) in [-1, 1] of generated scene images (references
    and targets of edits and compositions, at the sizes the trainer sees them)."""
    from uniref.data import SizeRange, TaskConfig, generate, parse_tasks
    from uniref.data.splits import split_seed
    from uniref.images import to_tensor

    config = TaskConfig(parse_tasks("edit,compose"), 4, SizeRange(side, 4 * side))
    rng = np.random.default_rng(seed)
    crops: list[torch.Tensor] = []
    i = 0
    while len(crops) < n:
        # The upper half of the train seed range: apart from SFT's stream, never a val or test scene.
        sample = generate(split_seed("train", 1 << 39, (seed * 1_000_003 + i) % (1 << 38)), config)
        i += 1
        for image in [*sample.refs, sample.target]:
            t = to_tensor(image)
            for _ in range(CROPS_PER_IMAGE):
                y = int(rng.integers(0, t.shape[1] - side + 1))
                x = int(rng.integers(0, t.shape[2] - side + 1))
                crops.append(t[:, y : y + side, x : x + side])
    return torch.stack(crops[:n])


def reconstruction_psnr(codec: Codec, images: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [-1, 1] read as [0, 1]) of decode(encode(x))."""
    with torch.no_grad():
        out = codec.decode(codec.encode(images))
    mse = ((out - images) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def train_codec(
    out: str | Path,
    minutes: float,
    config: CodecConfig | None = None,
    batch: int = 32,
    side: int = 32,
    seed: int = 0,
    max_steps: int | None = None,
) -> tuple[Codec, float]:
    """Train for ``minutes`` of wall time or ``max_steps`` steps, whichever ends first (L1 + MSE on
    scene crops), measure the latent statistics, save to ``out``; returns the codec and its PSNR on
    held-out crops."""
    torch.manual_seed(seed)
    codec = Codec(config or CodecConfig())
    opt = torch.optim.AdamW(codec.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.0)
    held_out = scene_crops(seed + 1_000_000, 128, side)
    deadline = time.monotonic() + minutes * 60
    bar = tqdm(desc="codec", unit="step")
    step = 0
    while time.monotonic() < deadline and (max_steps is None or step < max_steps):
        x = scene_crops(seed * 7919 + step, batch, side)
        y = codec.decoder(codec.encoder(x))
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Cosine over the wall-time budget: the last minutes refine at a low rate.
        progress = 1 - max(0.0, deadline - time.monotonic()) / (minutes * 60)
        if max_steps is not None:
            progress = max(progress, (step + 1) / max_steps)
        for group in opt.param_groups:
            group["lr"] = LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    codec.eval().requires_grad_(False)
    with torch.no_grad():
        z = codec.encoder(scene_crops(seed + 2_000_000, 256, side))
        codec.mean.copy_(z.mean(dim=(0, 2, 3)))
        codec.std.copy_(z.std(dim=(0, 2, 3)).clamp_min(1e-3))
    save_codec(codec, out)
    return codec, reconstruction_psnr(codec, held_out)
