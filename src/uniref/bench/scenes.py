"""``scenes``: our scene-world benchmark in the same runner and report as the published ones.

Every sample has its ground truth, so it is scored exactly (:mod:`uniref.rewards.metrics`, the numbers of
``uniref eval``) with no judge; given a judge, the same outputs are also judged on the three axes the MSGRPO
reward asks (:mod:`uniref.rewards.judge`, same prompts), and the report puts the judged scores beside the
exact ones, which says how far a judge can be trusted on this data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from uniref.bench import scores as S
from uniref.bench.suite import Item, Question, Suite, safe_name
from uniref.data.formats import LoadReport, iter_samples
from uniref.errors import DataError
from uniref.rewards.judge import CONSISTENCY_PROMPT, INTEGRATION_PROMPT, MAX_SCORE, QUALITY_PROMPT, SYSTEM_PROMPT
from uniref.rewards.metrics import Scorer

EXACT = ("overall", "ref_consistency", "worst_ref", "instruction", "quality")
JUDGED = ("judged_overall", "judged_worst_ref", "judged_instruction", "judged_quality")


def _template(prompt: str, k: int) -> str:
    return prompt.format(k=k, instruction="{instruction}")  # k now; the instruction when the question is asked


class Scenes(Suite):
    name = "scenes"
    headline = "overall"
    metrics = EXACT + JUDGED
    system_prompt = SYSTEM_PROMPT
    exact = True
    deviations = ("exact scores from the scene's ground truth; judged scores use the MSGRPO judge's prompts",)

    def load(self, data: Path, report: LoadReport, limit: int | None = None) -> list[Item]:
        items = []
        for i, sample in enumerate(iter_samples(data, report)):
            if not sample.spec or "target" not in sample.spec:
                raise DataError(f"{data}: row {report.rows} has no scene-world spec; make one with uniref data make")
            items.append(
                Item(
                    f"{i:05d}",
                    sample.task or "unknown",
                    sample.instruction,
                    list(sample.refs),
                    extra={"sample": sample},
                )
            )
            if limit is not None and len(items) >= limit:
                break
        return items

    def output_path(self, root: Path, model: str, item: Item) -> Path:
        return root / safe_name(model) / safe_name(item.task_type) / f"{item.key}.png"

    def like(self, item: Item) -> Image.Image:
        return item.extra["sample"].target  # the target's aspect, as uniref eval

    def other_output(self, items: Sequence[Item], index: int) -> Image.Image | None:
        return items[(index + 1) % len(items)].extra["sample"].target

    def questions(self, item: Item, output: Image.Image) -> list[Question]:
        refs = tuple((f"Picture {i + 1}:", img) for i, img in enumerate(item.images))
        shown = (*refs, ("Output:", output))
        return [
            Question("integration", _template(INTEGRATION_PROMPT, item.k), ("score",), shown, item.instruction),
            Question(
                "consistency",
                _template(CONSISTENCY_PROMPT, item.k),
                tuple(f"picture {i + 1}" for i in range(item.k)),
                shown,
                item.instruction,
            ),
            Question(
                "quality", _template(QUALITY_PROMPT, item.k), ("score",), (("Output:", output),), item.instruction
            ),
        ]

    def sample_scores(self, item: Item, output: Image.Image, answers: dict[str, list[float]] | None) -> Any:
        if "_scorer" not in item.extra:  # built once per sample, shared by the model and the baselines
            item.extra["_scorer"] = Scorer(item.extra["sample"])
        exact = item.extra["_scorer"](output)
        out = {
            "overall": exact.overall,
            "ref_consistency": exact.ref_consistency,
            "worst_ref": exact.worst_ref,
            "instruction": exact.instruction,
            "quality": exact.quality,
        }
        if answers is None:  # the judge was asked and failed: exact scores stand, judged ones are unscored
            return {**out, "judge_unscored": 1.0}
        if answers:
            instruction = answers["integration"][0] / MAX_SCORE
            worst = min(answers["consistency"]) / MAX_SCORE
            out |= {
                "judged_overall": math.sqrt(instruction * worst),
                "judged_worst_ref": worst,
                "judged_instruction": instruction,
                "judged_quality": answers["quality"][0] / MAX_SCORE,
                "judge_unscored": 0.0,
            }
        return out

    def tables(self, rows: Sequence[S.Row]) -> dict[str, dict[Any, dict[str, float]]]:
        return {
            "by task": {**S.group_means(rows, lambda f: f["task_type"]), "overall": S.mean_over_samples(rows)},
            "by number of references": S.group_means(rows, lambda f: f["k"]),
        }
