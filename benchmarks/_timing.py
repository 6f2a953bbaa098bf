"""Helpers of ``benchmarks.bench_model`` and its sections: interleaved arms, paired ratios, verdicts,
stand-in inputs."""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image

from uniref.budget import Size

ROOT = Path(__file__).resolve().parent.parent


# --- timing helpers ---------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the ratios of interleaved pairs (robust to a load change between pairs). The pairs
    are the first entries of both lists; a list may go on with extra runs of its own arm."""
    n = min(len(num), len(den))
    return median([a / b for a, b in zip(num[:n], den[:n], strict=True)])


def key(k: int, mode: str) -> str:
    """Results key of one (K, plan mode) arm, e.g. ``"6 per_image"`` (JSON-friendly)."""
    return f"{k} {mode}"


def alternate(names: Sequence[str], i: int) -> list[str]:
    """A, B on even rounds and B, A on odd ones, so neither arm always runs first."""
    return list(names) if i % 2 == 0 else list(names)[::-1]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def load_qwen_tiny() -> ModuleType:
    """tests/qwen_tiny.py (offline tiny Qwen-Image-Edit components), imported by path."""
    spec = importlib.util.spec_from_file_location("qwen_tiny", ROOT / "tests" / "qwen_tiny.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(size: Size, seed: int) -> Image.Image:
    """A smooth random RGB image (coarse noise upsampled), so resizing costs what a photo's does."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(12, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(coarse, mode="RGB").resize((size.width, size.height), Image.Resampling.BILINEAR)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def holds(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def at_most(value: float, goal: float) -> str:
    """Verdict on the value as shown (2 decimals), so that "1.30×" never reads as failing 1.3."""
    return holds(round(value, 2) <= goal)


def at_least(value: float, goal: float) -> str:
    return holds(round(value, 2) >= goal)
