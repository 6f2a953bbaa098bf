"""Model registry: named flavours behind the one :class:`EditModel` protocol.

``load_model("tiny")`` gives the embedded default, ``load_model("tiny-random")`` the untrained tiny
model, and ``load_model(PATH)`` a local folder: a diffusers-format Qwen-Image-Edit-2509/2511 folder
(its variant read from the transformer config), a Qwen-Image-2.1 folder (``QwenImage21Pipeline`` in
its ``model_index.json``) or a UniRef tiny checkpoint. ``load_model(
"qwen-image-edit-2511", path=PATH)`` forces a variant.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniref.errors import ModelError
from uniref.models.base import Conditioning, EditModel, LatentSpec, ScheduleSpec

__all__ = ["Conditioning", "EditModel", "LatentSpec", "ScheduleSpec", "load_model", "registry"]

# name -> "module:function"; modules are imported lazily so `uniref plan` never imports diffusers.
registry: dict[str, str] = {
    "tiny": "uniref.models.tiny:load_tiny",
    "tiny-random": "uniref.models.tiny:load_tiny_random",
    "qwen-image-edit-2509": "uniref.models.qwen_image:load_qwen_image_edit_2509",
    "qwen-image-edit-2511": "uniref.models.qwen_image:load_qwen_image_edit_2511",
    "qwen-image-2.1": "uniref.models.qwen_image21:load_qwen_image_21",
}
# diffusers pipeline class (model_index.json "_class_name") prefix -> loader of such a folder.
_DIFFUSERS_LOADERS = {
    "QwenImage21": "uniref.models.qwen_image21:load_qwen_image_21",
    "QwenImageEdit": "uniref.models.qwen_image:load_qwen_image_edit",
}


def _resolve(target: str) -> Callable[..., EditModel]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def load_model(name_or_path: str | Path, *, path: str | Path | None = None, **kwargs: Any) -> EditModel:
    """Build a model by flavour name or from a local folder (see the module docstring)."""
    name = str(name_or_path)
    if name in registry:
        if path is not None:
            kwargs["path"] = path
        return _resolve(registry[name])(**kwargs)
    folder = Path(name)
    if not folder.exists():
        raise ModelError(f"model {name!r}: not a known flavour ({', '.join(registry)}) and no such folder")
    if not folder.is_dir():
        raise ModelError(f"model {name!r}: expected a folder (diffusers format or a UniRef checkpoint)")
    if (folder / "model_index.json").is_file():
        return _resolve(_diffusers_loader(folder))(folder, **kwargs)
    if (folder / "uniref_model.json").is_file():
        return _resolve("uniref.models.tiny:load_tiny_folder")(folder, **kwargs)
    raise ModelError(
        f"{folder}: not a model folder: expected model_index.json (diffusers Qwen-Image-Edit) "
        "or uniref_model.json (UniRef tiny checkpoint)"
    )


def _diffusers_loader(folder: Path) -> str:
    """The loader for a diffusers folder, from its pipeline class; the Qwen-Image-Edit loader (which
    names what it expected) for anything else."""
    try:
        pipeline = str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))
    except (json.JSONDecodeError, AttributeError):
        pipeline = ""  # the loader reports the bad file with its own message
    for prefix, target in _DIFFUSERS_LOADERS.items():
        if pipeline.startswith(prefix):
            return target
    return _DIFFUSERS_LOADERS["QwenImageEdit"]
