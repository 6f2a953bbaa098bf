"""Looking at a run while it trains: preview grids and a validation pass with the exact metrics.

Both use the EMA weights (what a checkpoint ships), the unwrapped network (only the main process
samples, so no collective may run), and held-out samples from the *val* seed range, which training
never draws. Previews go to ``previews/step_XXXXXXXX.png`` (references | output | target), and the
validation metrics to TensorBoard, ``metrics.jsonl`` and ``val/step_XXXXXXXX.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uniref.data import SizeRange, TaskConfig, parse_tasks
from uniref.data.sample import Sample
from uniref.data.splits import split_samples
from uniref.eval import evaluate
from uniref.images import atomic_path, image_size, save_image
from uniref.pipeline import EditPipeline
from uniref.train.data import mix_entry
from uniref.train.runtime import Runtime
from uniref.viz import SheetRow, draw_sheet

PREVIEW_SAMPLES = 6  # rows of a preview grid
VAL_BATCH = 8


class Observer:
    """Call :meth:`after_step` after every optimizer step; it acts on the configured multiples."""

    def __init__(self, config: Any, runtime: Runtime) -> None:
        self.config = config
        self.rt = runtime
        data = config.data
        self.task_config = TaskConfig(
            tasks=parse_tasks(",".join(mix_entry(name, data.max_refs)[0] for name in data.task_mix)),
            max_refs=data.max_refs,
            size_range=SizeRange.parse(data.size_range),
        )
        self._val: list[Sample] | None = None

    def val_samples(self, n: int) -> list[Sample]:
        if self._val is None or len(self._val) < n:
            self._val = split_samples("val", max(n, PREVIEW_SAMPLES), self.task_config)
        return self._val[:n]

    def after_step(self, step: int, budget: int, target_budget: int, final: bool = False) -> None:
        """``budget`` and ``target_budget`` as the pipeline takes them: a side (64 means 64² pixels)."""
        log = self.config.log
        preview = step % log.preview_every == 0 or final
        validate = log.val_samples > 0 and (step % log.val_every == 0 or final)
        if not self.rt.is_main or not (preview or validate):
            return
        with self.rt.sampling_model() as model:
            pipe = EditPipeline(model)
            if preview:
                self.preview(pipe, step, budget, target_budget)
            if validate:
                self.validate(pipe, step, budget, target_budget)

    def preview(self, pipe: EditPipeline, step: int, budget: int, target_budget: int) -> Path:
        samples = self.val_samples(PREVIEW_SAMPLES)
        result = pipe.generate(
            [s.instruction for s in samples],
            [s.refs for s in samples],
            steps=self.config.log.val_steps,
            budget=budget,
            target_budget=target_budget,
            progress=False,
            target_like=[image_size(s.target) for s in samples],
        )
        rows = [
            SheetRow(list(s.refs), [out, s.target], f"[{s.task}] {s.instruction}")
            for s, out in zip(samples, result.images, strict=True)
        ]
        return save_image(draw_sheet(rows), self.rt.out / "previews" / f"step_{step:08d}.png")

    def validate(self, pipe: EditPipeline, step: int, budget: int, target_budget: int) -> dict[str, float]:
        report = evaluate(
            pipe,
            self.val_samples(self.config.log.val_samples),
            steps=self.config.log.val_steps,
            batch_size=VAL_BATCH,
            budget=budget,
            target_budget=target_budget,
            progress=False,
        )
        scalars = {f"val/{k}": float(v) for k, v in report.to_json(records=False).items() if isinstance(v, float)}
        self.rt.log(step, scalars)
        path = self.rt.out / "val" / f"step_{step:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report.to_json(records=False), indent=1))
        return scalars
