"""Typed configs: YAML files under ``configs/`` plus ``a.b=c`` overrides.

Every config is a pydantic model that forbids unknown keys, so a typo is an error naming the key
instead of a silently ignored setting. Override values are parsed as YAML scalars (``3``, ``1e-4``,
``true``, ``[64, 96]``), then the whole config is validated again. The fully resolved config is
saved with every run (``config.yaml`` in the output directory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uniref.errors import ConfigError
from uniref.images import atomic_path

C = TypeVar("C", bound="StrictModel")


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, fields are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunSection(StrictModel):
    output_dir: Path = Field(Path("runs/default"), description="where checkpoints, logs and previews go")
    seed: int = Field(0, description="seed for model init, data order and sampling")


class TrainSection(StrictModel):
    max_steps: int = Field(1000, ge=0, description="optimizer steps in total (all stages)")


class TrainingConfig(StrictModel):
    """The sections every training config has; SFT and RL configs extend it."""

    run: RunSection = Field(default_factory=RunSection)
    train: TrainSection = Field(default_factory=TrainSection)

    def stage_ends(self) -> list[int]:
        """Optimizer steps that end a curriculum stage (their checkpoints are kept); none by default."""
        return []


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set as a value and as a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def build_config(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
    """Validate ``data`` as ``cls``; the first problem becomes a ConfigError naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key {key!r}") from None
        raise ConfigError(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Read a YAML file (optional), apply ``a.b=c`` overrides, validate as ``cls``."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source += " (with overrides)"
    return build_config(cls, data, source)


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config as YAML, atomically."""
    path = Path(path)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
