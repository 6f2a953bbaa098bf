"""Disk cache of the frozen encoders' outputs (VAE latents, text / vision-language conditioning).

For Qwen-Image-Edit the VAE and the 7B Qwen2.5-VL encoder are frozen, and on a fixed dataset every
epoch, every resumed run and every ablation arm would otherwise encode the same images and
instructions again. ``data.cache_dir`` wraps the model so that each encoded item is stored once, as
its own safetensors file named by a hash of everything that determines it: the model's identity and
dtype, the exact input tensor or image bytes, the instruction and the planned reference sizes. A
different budget plans different sizes, so stages never read each other's entries.

Delete the folder when the encoders' weights change: the key names the model, not its weights.
Scene data generated on the fly never repeats a sample, so the cache only pays off on datasets.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from uniref.budget import Size
from uniref.models.base import Conditioning, EditModel


class EncodingCache:
    """Per-item store under ``folder`` (two-level fan-out by hash); counts hits and misses."""

    def __init__(self, folder: str | Path, model_key: str) -> None:
        self.folder = Path(folder)
        self.model_key = model_key
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, *parts: bytes) -> str:
        digest = hashlib.sha256(f"{self.model_key}\0{kind}".encode())
        for part in parts:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(path)["value"]
        except Exception:  # a torn or foreign file is recomputed and rewritten, never trusted
            return None

    def store(self, key: str, value: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"value": value.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)  # atomic: concurrent ranks write the same bytes, readers never see half
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def fetch(self, keys: Sequence[str], compute: Any) -> list[torch.Tensor]:
        """Cached values for ``keys``; ``compute(indices)`` encodes the missing ones (one batched call)."""
        found = [self.load(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, value in zip(missing, compute(missing), strict=True):
                self.store(keys[i], value)
                found[i] = value.detach().cpu()
        return found  # type: ignore[return-value]

    @property
    def hit_fraction(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return str(tuple(t.shape)).encode() + t.numpy().tobytes()


def _image_bytes(img: Image.Image) -> bytes:
    return f"{img.mode}{img.size}".encode() + img.tobytes()


class CachedEncoders:
    """``model`` with ``encode_images`` and ``encode_condition`` served from an :class:`EncodingCache`;
    every other attribute is the model's own, so it drops into ``make_batch`` and the trainers."""

    def __init__(self, model: EditModel, cache: EncodingCache) -> None:
        self.model = model
        self.cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        keys = [self.cache.key("image", _tensor_bytes(img)) for img in images]
        values = self.cache.fetch(keys, lambda idx: self.model.encode_images([images[i] for i in idx]))
        device, dtype = self.model.device, self.model.dtype
        return [v.to(device, dtype) for v in values]

    def encode_condition(
        self,
        instructions: Sequence[str],
        refs: Sequence[Sequence[Image.Image]],
        ref_sizes: Sequence[Sequence[Size]],
    ) -> Conditioning:
        keys = [
            self.cache.key(
                "condition",
                text.encode(),
                str([tuple(s) for s in sizes]).encode(),
                *[_image_bytes(r) for r in images],
            )
            for text, images, sizes in zip(instructions, refs, ref_sizes, strict=True)
        ]

        def compute(idx: list[int]) -> list[torch.Tensor]:
            cond = self.model.encode_condition(
                [instructions[i] for i in idx], [refs[i] for i in idx], [ref_sizes[i] for i in idx]
            )
            return list(cond.txt)

        values = self.cache.fetch(keys, compute)
        return Conditioning([v.to(self.model.device) for v in values])


def with_cache(model: EditModel, folder: str | Path | None, model_key: str) -> EditModel:
    """``model`` itself when ``folder`` is None, else the model behind a disk cache in ``folder``."""
    if folder is None:
        return model
    return CachedEncoders(model, EncodingCache(folder, f"{model_key}\0{model.dtype}"))  # type: ignore[return-value]
