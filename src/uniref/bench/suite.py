"""What a benchmark is to the runner: how to read a row, where its output goes, what the judge is asked,
and how the answers become the published score.

A :class:`Suite` turns each raw row (published field names) into an :class:`Item`; the runner generates the
item's output, asks the suite's :class:`Question` s (one chat call each, cached), and hands the answers back to
:meth:`Suite.sample_scores`. Aggregation is the suite's :meth:`Suite.tables`, so every formula of a benchmark
lives in one place (:mod:`uniref.bench.scores` for the arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from uniref.bench.rows import ImageResolver, iter_rows
from uniref.bench.scores import Row
from uniref.data.formats import LoadReport, Problem
from uniref.errors import DataError, ImageInputError


@dataclass
class Item:
    """One benchmark sample: the inputs the model gets and what its judge needs besides the output."""

    key: str  # the benchmark's own sample key (names the output file)
    task_type: str
    instruction: str
    images: list[Image.Image]  # "picture 1".."picture K", in the benchmark's order
    language: str = "en"
    extra: dict[str, Any] = field(default_factory=dict)  # per benchmark: reference image, weight W, flags...

    @property
    def k(self) -> int:
        return len(self.images)

    def fields(self) -> dict[str, Any]:
        """What the aggregations group by."""
        return {
            "key": self.key,
            "task_type": self.task_type,
            "language": self.language,
            "k": self.k,
            **{name: value for name, value in self.extra.items() if isinstance(value, str | int | float | bool)},
        }


@dataclass(frozen=True)
class Question:
    """One judgement: labelled images, then the rubric; ``labels`` name the scores the answer must give."""

    name: str  # e.g. "PF", "SC", "PQ": the cache and the report key
    template: str  # the rubric; "{instruction}" in it is replaced; its fingerprint is the prompt version
    labels: tuple[str, ...]  # one per score asked, in answer order
    images: tuple[tuple[str, Image.Image], ...]  # (label shown before it, image)
    instruction: str = ""
    low: float = 0.0
    high: float = 10.0

    @property
    def text(self) -> str:
        return self.template.replace("{instruction}", self.instruction)


class Suite:
    """Base of every benchmark (see the module docstring); subclasses fill in the published details."""

    name: str = ""
    headline: str = ""  # the score the benchmark reports first
    metrics: tuple[str, ...] = ()  # per-sample scores, in table order
    system_prompt: str = ""
    json_names: tuple[str, ...] = ()  # the repository layout's file names, tried first in a folder
    all_json: bool = False  # a folder holds several JSON/JSONL files to read together (one per task)
    exact: bool = False  # scores without a judge (the scene world's exact metrics)
    deviations: tuple[str, ...] = ()  # where we differ from the official scripts on purpose (for the report)

    # --- reading --------------------------------------------------------------------------------------

    def item(self, row: dict[str, Any], key_hint: str | None, resolve: ImageResolver) -> Item:
        raise NotImplementedError

    def load(self, data: Path, report: LoadReport, limit: int | None = None) -> list[Item]:
        """The good items of ``data`` (the first ``limit``); every bad row is a problem in ``report``."""
        items: list[Item] = []
        keys: set[str] = set()
        for source in self._sources(data):
            for row_no, key_hint, row, resolve in iter_rows(source, report, self.json_names):
                where = source.name if source.is_file() else str(source)
                try:
                    item = self.item(row, key_hint, resolve)
                except (DataError, ImageInputError) as exc:
                    report.problems.append(Problem(row_no, where, str(exc)))
                    continue
                if self.uid(item) in keys:  # two rows would write one output file
                    report.problems.append(Problem(row_no, where, f"duplicate key {self.uid(item)!r}"))
                    continue
                keys.add(self.uid(item))
                report.ok += 1
                report.by_task[item.task_type] += 1
                report.by_k[item.k] += 1
                items.append(item)
                if limit is not None and len(items) >= limit:
                    return items
        return items

    def _sources(self, data: Path) -> Iterator[Path]:
        if self.all_json and data.is_dir():
            found = sorted(p for p in data.iterdir() if p.suffix in (".json", ".jsonl"))
            if found:
                yield from found
                return
        yield data

    def uid(self, item: Item) -> str:
        """What tells samples apart (the key; GEdit-Bench reuses a key across languages)."""
        return item.key

    def excluded(self, item: Item) -> str | None:
        """Why ``item`` is generated but left out of the published score (None: it counts)."""
        return None

    # --- generating ----------------------------------------------------------------------------------

    def output_path(self, root: Path, model: str, item: Item) -> Path:
        raise NotImplementedError

    def companion_files(self, root: Path, model: str, item: Item) -> dict[Path, Image.Image]:
        """Files the official scorer needs beside the output (GEdit-Bench's source image)."""
        return {}

    def like(self, item: Item) -> Image.Image:
        """The image whose aspect the output takes."""
        return item.images[0]

    # --- judging and scoring --------------------------------------------------------------------------

    def questions(self, item: Item, output: Image.Image) -> list[Question]:
        raise NotImplementedError

    def other_output(self, items: Sequence[Item], index: int) -> Image.Image | None:
        """The ``other_target`` baseline: a right answer to another sample, when the benchmark has one."""
        return None

    def sample_scores(
        self, item: Item, output: Image.Image, answers: dict[str, list[float]] | None
    ) -> dict[str, float] | None:
        """The published per-sample scores from the judge's ``answers`` (question name -> scores); ``answers``
        is None when a judgement failed (unscored) and ``{}`` when no judge was asked (exact suites)."""
        raise NotImplementedError

    def tables(self, rows: Sequence[Row]) -> dict[str, dict[Any, dict[str, float]]]:
        """Named tables (title -> group -> metric -> value, with ``n`` and ``unscored``) over the scored rows;
        each has an ``overall`` group computed the way the benchmark reports its headline."""
        raise NotImplementedError


def image_field(row: dict[str, Any], name: str, resolve: ImageResolver) -> Image.Image:
    if name not in row or row[name] is None:
        raise DataError(f"missing field {name!r}")
    return resolve(row[name], name)


def text_field(row: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"missing or empty field {name!r}")
        return ""
    if not isinstance(value, str | int):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}")
    return str(value).strip()


def image_list(row: dict[str, Any], name: str, resolve: ImageResolver) -> list[Image.Image]:
    value = row.get(name)
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"field {name!r} must be a non-empty list of images")
    return [resolve(v, f"{name}[{i}]") for i, v in enumerate(value)]


def safe_name(text: str) -> str:
    """A path component from a key or task name (no separators, no dot-dot)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+ " else "_" for c in str(text)).strip(" .")
    return cleaned or "_"
