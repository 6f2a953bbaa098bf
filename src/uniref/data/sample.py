"""One training/eval example: instruction, K references, target, task name and the ground-truth spec.

The spec is plain JSON (see :mod:`uniref.data.tasks` for its keys) so it travels unchanged through
JSONL manifests, HF datasets and webdataset shards, and the exact metrics can be recomputed from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    instruction: str
    refs: list[Image.Image]  # K >= 1 reference images, "picture 1".."picture K" in this order
    target: Image.Image
    task: str = ""
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.refs)
