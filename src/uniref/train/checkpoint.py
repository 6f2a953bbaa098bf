"""Atomic, complete training checkpoints.

A checkpoint is a folder ``checkpoints/step_00001234/`` holding everything needed to continue the
run exactly: the trainable weights (safetensors), the EMA weights, the optimizer and LR-scheduler
state, every RNG (python, numpy, torch, the run's own generators), the data stream's position, the
step and the curriculum stage. It is written into ``.step_00001234.tmp/``, each file fsynced, then
renamed into place, so a crash mid-write never leaves a half checkpoint that resume would pick up.
Only the newest ``keep_last`` are kept, and those that end a curriculum stage (to be scored later).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
WEIGHTS = "weights.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    keep_last: int = 3,
    keep_steps: Collection[int] = (),
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune old ones but the newest ``keep_last``
    and those of ``keep_steps``; returns its folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / EMA))
    torch.save({"step": step, **state}, tmp / STATE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a rerun reached the same step: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if checkpoint_step(old) not in keep_steps:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(weights, ema or None, state) of a checkpoint folder."""
    folder = Path(folder)
    weights = load_file(str(folder / WEIGHTS))
    ema = load_file(str(folder / EMA)) if (folder / EMA).is_file() else None
    state = torch.load(folder / STATE, weights_only=False)
    return weights, ema, state
