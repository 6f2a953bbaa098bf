"""Dataset formats: JSONL manifests (UniPic-3 / MICo compatible), webdataset shards, HF datasets.

A JSONL row is ``{"instruction": str, "input_images": [path, ...], "output_image": path}`` with paths
relative to the manifest, as UniPic-3 and MICo write them; UniRef adds ``"task"`` and ``"spec"`` (the
scene-world ground truth), which other tools ignore. A webdataset shard is a tar whose members are
``{key}.json`` (the same row without paths), ``{key}.ref{i}.png`` and ``{key}.target.png``. An HF dataset
has columns ``instruction``, ``input_images`` (list of images), ``output_image``, ``task``, ``spec``
(JSON text).

One reader, :func:`iter_samples`, streams any of them and validates every row: a missing or unreadable
image, K = 0, an empty instruction or a malformed row is recorded in a :class:`LoadReport` with its row
number and reason — counted and reported, never silently dropped.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from uniref.data.sample import Sample
from uniref.errors import DataError, ImageInputError
from uniref.images import atomic_path, load_image, to_rgb

MANIFEST = "manifest.jsonl"
IMAGES_DIR = "images"
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000  # samples per webdataset shard
PNG_COMPRESS = 1  # zlib level: generated images are small; speed matters more than bytes


@dataclass(frozen=True)
class Problem:
    row: int  # 1-based row (line, sample) number
    file: str  # the file at fault, or the manifest/shard for a malformed row
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.file}: {self.reason}"


@dataclass
class LoadReport:
    rows: int = 0
    ok: int = 0
    problems: list[Problem] = field(default_factory=list)
    by_task: Counter[str] = field(default_factory=Counter)
    by_k: Counter[int] = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        return self.rows - self.ok


# --- writing ------------------------------------------------------------------------------------------


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=PNG_COMPRESS)


def sample_row(sample: Sample, ref_paths: list[str], target_path: str) -> dict[str, Any]:
    return {
        "instruction": sample.instruction,
        "input_images": ref_paths,
        "output_image": target_path,
        "task": sample.task,
        "spec": sample.spec,
    }


class JsonlWriter:
    """Writes images as they come and the manifest atomically at :meth:`close` (readers never see half)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def add(self, sample: Sample, key: str) -> None:
        refs = []
        for i, ref in enumerate(sample.refs):
            rel = f"{IMAGES_DIR}/{key}_ref{i + 1}.png"
            _save_png(ref, self.out_dir / rel)
            refs.append(rel)
        target = f"{IMAGES_DIR}/{key}_target.png"
        _save_png(sample.target, self.out_dir / target)
        self.rows.append(sample_row(sample, refs, target))

    def close(self) -> Path:
        path = self.out_dir / MANIFEST
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for row in self.rows:
                fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        return path


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS)
    return buf.getvalue()


def write_webdataset(
    samples: Iterable[Sample], out_dir: str | os.PathLike[str], shard_size: int = DEFAULT_SHARD_SIZE
) -> list[Path]:
    """Write ``samples`` as webdataset tar shards (``shard-000000.tar``, ...); returns the shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    it = iter(samples)
    n = 0
    while chunk := list(itertools.islice(it, shard_size)):
        shards.append(out / SHARD_PATTERN.format(len(shards)))
        with atomic_path(shards[-1]) as tmp, tarfile.open(tmp, "w") as tar:
            for sample in chunk:
                key = f"{n:08d}"
                n += 1
                row = {"instruction": sample.instruction, "task": sample.task, "spec": sample.spec, "k": sample.k}
                members = [(f"{key}.json", json.dumps(row).encode())]
                members += [(f"{key}.ref{i}.png", _png_bytes(r)) for i, r in enumerate(sample.refs)]
                members.append((f"{key}.target.png", _png_bytes(sample.target)))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


def to_hf_dataset(source: str | os.PathLike[str], report: LoadReport | None = None) -> Any:
    """A ``datasets.Dataset`` with image columns, from any readable source (bad rows land in ``report``)."""
    try:
        import datasets
    except ImportError:
        raise DataError("HF datasets support needs the 'data' extra: pip install 'uniref[data]'") from None

    def rows() -> Iterator[dict[str, Any]]:
        for s in iter_samples(source, report):
            yield {
                "instruction": s.instruction,
                "input_images": s.refs,
                "output_image": s.target,
                "task": s.task,
                "spec": json.dumps(s.spec),
            }

    features = datasets.Features(
        {
            "instruction": datasets.Value("string"),
            "input_images": datasets.Sequence(datasets.Image()),
            "output_image": datasets.Image(),
            "task": datasets.Value("string"),
            "spec": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_generator(rows, features=features)


# --- reading ------------------------------------------------------------------------------------------


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except Exception as exc:  # any decoder failure is a bad row, reported with its reason
        raise ImageInputError(f"{name}: not a readable image ({exc})") from None


def _validate(row: Any, row_no: int, where: str, report: LoadReport) -> str | None:
    """The reason ``row`` is malformed (before images are read), or None."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return "empty or missing instruction"
    refs = row.get("input_images")
    if not isinstance(refs, list) or not refs:
        return "no input images (K = 0)"
    if row.get("output_image") in (None, ""):
        return "missing output_image"
    return None


def _finish(sample: Sample, report: LoadReport) -> Sample:
    report.ok += 1
    report.by_task[sample.task or "unknown"] += 1
    report.by_k[sample.k] += 1
    return sample


def iter_json_lines(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of every non-blank line of a JSONL file; each counts as a row of
    ``report``, and a line that is not JSON is a problem there, never dropped silently."""
    with open(path, encoding="utf-8") as fh:
        for row_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            report.rows += 1
            try:
                yield row_no, json.loads(line)
            except json.JSONDecodeError as exc:
                report.problems.append(Problem(row_no, path.name, f"invalid JSON ({exc.msg})"))


def _iter_jsonl(path: Path, report: LoadReport) -> Iterator[Sample]:
    root = path.parent
    for row_no, row in iter_json_lines(path, report):
        reason = _validate(row, row_no, path.name, report)
        if reason:
            report.problems.append(Problem(row_no, path.name, reason))
            continue
        try:
            refs = [load_image(root / p) for p in row["input_images"]]
            target = load_image(root / row["output_image"])
        except ImageInputError as exc:
            report.problems.append(Problem(row_no, _relative(str(exc), root), _reason(exc)))
            continue
        spec = row.get("spec") or {}
        yield _finish(Sample(row["instruction"], refs, target, row.get("task", ""), spec), report)


def _relative(message: str, root: Path) -> str:
    path = message.split(": ", 1)[0]
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _reason(exc: Exception) -> str:
    parts = str(exc).split(": ", 1)
    return parts[1] if len(parts) == 2 else str(exc)


def _iter_tars(paths: list[Path], report: LoadReport) -> Iterator[Sample]:
    """Stream webdataset shards member by member (``r|``: no seeking, works on pipes)."""
    row_no = 0

    def emit(key: str, members: dict[str, bytes], shard: str) -> Sample | None:
        nonlocal row_no
        row_no += 1
        report.rows += 1
        if f"{key}.json" not in members:
            report.problems.append(Problem(row_no, f"{shard}:{key}", "no .json member"))
            return None
        try:
            row = json.loads(members[f"{key}.json"])
        except json.JSONDecodeError as exc:
            report.problems.append(Problem(row_no, f"{shard}:{key}.json", f"invalid JSON ({exc.msg})"))
            return None
        refs_names = sorted(
            (n for n in members if ".ref" in n), key=lambda n: int(n.rsplit(".ref", 1)[1].split(".")[0])
        )
        row.setdefault("input_images", refs_names)
        row.setdefault("output_image", f"{key}.target.png")
        reason = _validate({**row, "input_images": refs_names}, row_no, shard, report)
        if reason is None and f"{key}.target.png" not in members:
            reason = "no target image"
        if reason is None and row.get("k") not in (None, len(refs_names)):
            reason = f"{len(refs_names)} reference images but k = {row['k']}"
        if reason:
            report.problems.append(Problem(row_no, f"{shard}:{key}", reason))
            return None
        try:
            refs = [_decode(members[n], n) for n in refs_names]
            target = _decode(members[f"{key}.target.png"], f"{key}.target.png")
        except ImageInputError as exc:
            report.problems.append(Problem(row_no, f"{shard}:{_relative(str(exc), Path('.'))}", _reason(exc)))
            return None
        return _finish(Sample(row["instruction"], refs, target, row.get("task", ""), row.get("spec") or {}), report)

    for path in paths:
        key, members = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = Path(info.name).name
                    this_key = base.split(".", 1)[0]
                    if key is not None and this_key != key:
                        sample = emit(key, members, path.name)
                        if sample is not None:
                            yield sample
                        members = {}
                    key = this_key
                    members[base] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as exc:
            report.rows += 1
            report.problems.append(Problem(row_no + 1, path.name, f"unreadable shard ({exc})"))
        if key is not None and members:
            sample = emit(key, members, path.name)
            if sample is not None:
                yield sample


def _iter_hf(dataset: Any, report: LoadReport) -> Iterator[Sample]:
    """Rows of an HF ``Dataset`` or ``IterableDataset`` (streaming) with our column names."""
    for row_no, row in enumerate(dataset, start=1):
        report.rows += 1
        reason = _validate(row, row_no, "dataset", report)
        if reason:
            report.problems.append(Problem(row_no, "dataset", reason))
            continue
        try:
            refs = [_hf_image(im, f"input_images[{i}]") for i, im in enumerate(row["input_images"])]
            target = _hf_image(row["output_image"], "output_image")
        except ImageInputError as exc:
            report.problems.append(Problem(row_no, "dataset", str(exc)))
            continue
        spec = row.get("spec") or {}
        if isinstance(spec, str):
            spec = json.loads(spec) if spec else {}
        yield _finish(Sample(row["instruction"], refs, target, row.get("task") or "", spec), report)


def _hf_image(value: Any, name: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes"):
        return _decode(value["bytes"], name)
    if isinstance(value, dict) and value.get("path"):
        return load_image(value["path"])
    raise ImageInputError(f"{name}: no image data")


def iter_samples(source: Any, report: LoadReport | None = None, streaming: bool = True) -> Iterator[Sample]:
    """Stream valid samples from a dataset; every bad row is recorded in ``report``.

    ``source``: a folder with ``manifest.jsonl``, a ``.jsonl`` file, a ``.tar`` shard or a folder of
    shards, a folder written by ``datasets.Dataset.save_to_disk``, ``.parquet`` files (read by HF
    datasets, streamed when ``streaming``), or an HF ``Dataset``/``IterableDataset`` object.
    """
    report = report if report is not None else LoadReport()
    if not isinstance(source, str | os.PathLike):
        yield from _iter_hf(source, report)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such dataset (expected a folder with {MANIFEST}, a .jsonl, or .tar shards)")
    if path.is_dir() and (path / MANIFEST).exists():
        yield from _iter_jsonl(path / MANIFEST, report)
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, report)
    elif path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        yield from _iter_tars([path] if path.is_file() else sorted(path.glob("*.tar")), report)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        import datasets

        yield from _iter_hf(datasets.load_from_disk(str(path)), report)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        import datasets

        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        yield from _iter_hf(
            datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming), report
        )
    else:
        raise DataError(f"{path}: not a dataset: expected {MANIFEST}, a .jsonl, .tar shards, parquet or save_to_disk")


def check_dataset(source: Any) -> LoadReport:
    """Read every row of ``source`` and return counts and problems."""
    report = LoadReport()
    for _ in iter_samples(source, report):
        pass
    return report
