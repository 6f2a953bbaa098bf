"""The scene world (procedural edit/composition data with exact ground truth) and dataset formats."""

from uniref.data.sample import Sample
from uniref.data.scenes import Background, Scene, SceneObject, render
from uniref.data.tasks import SizeRange, TaskConfig, generate, parse_tasks, render_spec

__all__ = [
    "Background",
    "Sample",
    "Scene",
    "SceneObject",
    "SizeRange",
    "TaskConfig",
    "generate",
    "parse_tasks",
    "render",
    "render_spec",
]
