"""Benchmark rows as their users have them on disk, read one way whatever the layout.

Three layouts, the ones the benchmarks are published and fetched in:

* a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: its one split, or
  ``train``/``test``);
* parquet files (a file, or every ``*.parquet`` under a folder: the layout of a Hub snapshot);
* the JSON / JSONL + images layout of a benchmark's repository: a list of rows, or an object whose keys
  are sample keys (ImgEdit's ``{key: {id, prompt, edit_type}}``), with image paths relative to the file.

:func:`iter_rows` yields ``(row_no, key_hint, row, resolver)``: the raw row (a dict with the published field
names), the key when the layout carries it outside the row, and a resolver that turns any image value of the
row (a PIL image as ``datasets`` decodes it, ``{"bytes"|"path"}``, or a path string) into an RGB image. A
row that is not an object is a :class:`~uniref.data.formats.Problem` in the report, never dropped silently.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from uniref.data.formats import LoadReport, Problem, iter_json_lines
from uniref.errors import DataError, ImageInputError
from uniref.images import load_image, to_rgb

ImageResolver = Callable[[Any, str], Image.Image]  # (value, field name) -> RGB image
Row = tuple[int, str | None, dict[str, Any], ImageResolver]
JSON_SUFFIXES = (".json", ".jsonl")


def resolver_for(root: Path | None) -> ImageResolver:
    """Images as ``datasets`` gives them (PIL, ``{"bytes"}``, ``{"path"}``) or path strings under ``root``."""

    def resolve(value: Any, name: str) -> Image.Image:
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict) and value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as img:
                    img.load()
                    return to_rgb(img)
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImageInputError(f"{name}: embedded image cannot be decoded ({exc})") from None
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str) and path:
            candidate = Path(path)
            if not candidate.is_absolute() and root is not None:
                candidate = root / candidate
            return load_image(candidate)
        raise ImageInputError(f"{name}: no image data (got {type(value).__name__})")

    return resolve


def _hf_rows(dataset: Any, report: LoadReport) -> Iterator[Row]:
    resolve = resolver_for(None)
    for row_no, row in enumerate(dataset, start=1):
        report.rows += 1
        yield row_no, None, dict(row), resolve


def _one_split(loaded: Any, path: Path) -> Any:
    """A ``DatasetDict``'s split to read: the only one, else ``test`` or ``train`` (benchmarks ship either)."""
    if not hasattr(loaded, "keys"):
        return loaded
    splits = list(loaded.keys())
    for name in (splits[0],) if len(splits) == 1 else ("test", "train"):
        if name in loaded:
            return loaded[name]
    raise DataError(f"{path}: a DatasetDict with splits {splits}; keep one split in the folder")


def _json_rows(path: Path, report: LoadReport) -> Iterator[Row]:
    resolve = resolver_for(path.parent)
    if path.suffix == ".jsonl":
        for row_no, row in iter_json_lines(path, report):
            if not isinstance(row, dict):
                report.problems.append(Problem(row_no, path.name, f"a row must be an object, got {type(row).__name__}"))
                continue
            yield row_no, None, row, resolve
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = [(None, r) for r in data]
    else:
        raise DataError(f"{path}: expected a list of rows or an object of key -> row, got {type(data).__name__}")
    for row_no, (key, row) in enumerate(items, start=1):
        report.rows += 1
        if not isinstance(row, dict):
            report.problems.append(Problem(row_no, path.name, f"a row must be an object, got {type(row).__name__}"))
            continue
        yield row_no, key, row, resolve


def iter_rows(data: Path, report: LoadReport, json_names: tuple[str, ...] = ()) -> Iterator[Row]:
    """Every row of the benchmark at ``data`` (see the module docstring). ``json_names``: the file names to
    look for in a folder of the repository layout (e.g. ``basic_edit.json``), tried before any other JSON."""
    if not data.exists():
        raise DataError(f"{data}: no such benchmark folder or file")
    if data.is_dir() and any((data / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        yield from _hf_rows(_one_split(datasets.load_from_disk(str(data)), data), report)
        return
    parquet = [data] if data.suffix == ".parquet" else sorted(data.rglob("*.parquet")) if data.is_dir() else []
    if parquet:
        import datasets

        files = [str(p) for p in parquet]
        yield from _hf_rows(datasets.load_dataset("parquet", data_files=files, split="train"), report)
        return
    if data.is_file() and data.suffix in JSON_SUFFIXES:
        yield from _json_rows(data, report)
        return
    if data.is_dir():
        named = [data / n for n in json_names if (data / n).exists()]
        found = named or sorted(p for p in data.iterdir() if p.suffix in JSON_SUFFIXES)
        if len(found) == 1 or named:
            yield from _json_rows(found[0], report)
            return
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{data}: several JSON files ({names}); pass the one to read with --data")
    raise DataError(
        f"{data}: not a benchmark: expected a save_to_disk folder, parquet files, or a JSON/JSONL file with images"
    )
