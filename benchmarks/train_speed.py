"""Training steps per second of the tiny flavour at several widths (issue 17 §3: width against steps/s).

Each width trains ``--steps`` steps from scratch on the one-object mix (``add`` + K = 2 ``compose``) at
128², batch 16, on all the threads torch has, one width after another in this process, so the ratios
are side by side on one machine. The first ``--warmup`` steps are left out of the timing (allocation,
the data worker's start, and with ``--compile`` inductor's compile). Run it on an otherwise idle machine:
a run beside it halves every figure.

    python -m benchmarks.train_speed --widths 128,192,256 --steps 40
    python -m benchmarks.train_speed --widths 128 --compile --steps 60 --warmup 15   # eager vs model.compile
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from uniref.config import build_config
from uniref.train.config import SFTConfig
from uniref.train.sft import train_sft

HEAD_DIM = 32  # the shipped model's (width 128, 4 heads): every width keeps the RoPE split


def speed_config(
    width: int, steps: int, folder: Path, budget: int = 128, batch: int = 16, compile_blocks: bool = False
) -> SFTConfig:
    """The shipped recipe's model at ``width`` on the one-object mix, ``steps`` steps into ``folder``."""
    data = {
        "run": {"output_dir": str(folder), "seed": 0},
        "train": {"max_steps": steps},
        "model": {
            "name": "tiny-random",
            "tiny": {"width": width, "heads": width // HEAD_DIM, "binding_budget": 1024, "codec": "scenes", "patch": 1},
            "compile": compile_blocks,
        },
        "loss": {"weighting": "x0"},
        "data": {
            "source": "scenes",
            "task_mix": {"add": 0.5, "compose": 0.5},
            "max_refs": 2,
            "size_range": "48:160",
            "workers": 1,
            "encode_in_workers": True,
        },
        "stages": [{"budget": budget, "steps": steps, "batch_size": batch}],
        "optim": {"lr": 5e-4, "warmup_steps": 10},
        "log": {
            "log_every": 1,
            "checkpoint_every": 10 * steps,
            "keep_last": 1,
            "preview_every": 10 * steps,
            "val_every": 10 * steps,
            "val_samples": 0,
            "progress": False,
        },
    }
    return build_config(SFTConfig, data, f"train_speed width {width}")


def seconds_per_step(metrics: Path, warmup: int) -> float:
    """Mean wall seconds per step after ``warmup`` steps, from the run's logged step times."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = [r for r in rows if "time" in r and "loss" in r and r["step"] >= warmup]
    first, last = timed[0], timed[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="128,192,256")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget", type=int, default=128, help="output and reference budget side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="time each width eager and with model.compile")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    modes = [False, True] if args.compile else [False]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            for compiled in modes:
                folder = Path(tmp) / f"w{width}{'c' if compiled else ''}"
                train_sft(speed_config(width, args.steps, folder, args.budget, args.batch, compiled))
                rows.append((width, compiled, seconds_per_step(folder / "metrics.jsonl", args.warmup)))
    base = rows[0][2]
    print(f"| width | heads | blocks | s/step ({args.budget}², batch {args.batch}) | × width {widths[0]} eager |")
    print("|---:|---:|---|---:|---:|")
    for width, compiled, sec in rows:
        mode = "compiled" if compiled else "eager"
        print(f"| {width} | {width // HEAD_DIM} | {mode} | {sec:.2f} | {sec / base:.2f} |")


if __name__ == "__main__":
    main()
