"""Run a benchmark: generate (batched through :class:`~uniref.pipeline.EditPipeline`), judge (cached,
bounded concurrency), score with the published formulas, and keep everything a report needs.

Contestants are the model and the trivial baselines (``copy_first``, ``copy_last``, ``grey`` and, where
the benchmark has right answers, ``other_target``), each written in the benchmark's own output layout
under ``{out}/`` (baselines under ``{out}/baselines/``), so the official scripts can score any of them.
A killed run resumes: outputs on disk are reused when they were made with the same settings, and every
finished judgement is read back from the cache (:mod:`uniref.bench.cache`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from uniref.bench.cache import Judgement, JudgementCache, file_sha256, prompt_version
from uniref.bench.published import GEditBench, ImgEdit, MICoBench, OmniContext, load_mico_weights
from uniref.bench.scenes import Scenes
from uniref.bench.scores import Row, group_means
from uniref.bench.suite import Item, Question, Suite, safe_name
from uniref.data.formats import LoadReport
from uniref.errors import DataError, ImageInputError
from uniref.eval import BASELINES, trivial_output
from uniref.images import atomic_path, image_size, load_image, save_image
from uniref.rewards.judge import JudgeConfig, VLMJudge, image_part, judge_reason

SUITES: dict[str, type[Suite]] = {
    "omnicontext": OmniContext,
    "mico": MICoBench,
    "gedit": GEditBench,
    "imgedit": ImgEdit,
    "scenes": Scenes,
}
MODEL = "model"  # the contestant name of the model under test
SETTINGS_FILE = "generation.json"


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(SUITES)}")
    return SUITES[name]()


@dataclass
class Scored:
    """One (contestant, item): the published scores (None: unscored) and the judge's reasons."""

    scores: dict[str, float] | None
    reasons: dict[str, str] = field(default_factory=dict)
    path: str = ""


@dataclass
class BenchResult:
    suite: Suite
    items: list[Item]
    load: LoadReport
    settings: dict[str, Any]
    results: dict[str, list[Scored]]  # contestant -> one per item (excluded items: None scores)
    excluded: dict[str, int]  # reason -> count
    generation: dict[str, int]
    judge: dict[str, Any]  # asked, cached, unscored, torn cache lines, client stats; {} when not judged
    extra_counts: dict[str, Any] = field(default_factory=dict)  # e.g. MICo-Bench's W from file / missing

    @property
    def judged(self) -> bool:
        return bool(self.judge) or self.suite.exact

    def rows(self, contestant: str) -> list[Row]:
        return [
            (item.fields(), scored.scores)
            for item, scored in zip(self.items, self.results[contestant], strict=True)
            if self.suite.excluded(item) is None
        ]

    def tables(self, contestant: str) -> dict[str, dict[Any, dict[str, float]]]:
        rows = self.rows(contestant)
        tables = self.suite.tables(rows)
        if not any("number of references" in t for t in tables):
            tables["by number of references"] = group_means(rows, lambda f: f["k"])
        return tables

    def summary(self) -> dict[str, Any]:
        contestants = {
            name: {title: {str(g): v for g, v in table.items()} for title, table in self.tables(name).items()}
            for name in self.results
        }
        return {
            "benchmark": self.suite.name,
            "headline": self.suite.headline,
            "settings": self.settings,
            "rows": {"read": self.load.rows, "bad": len(self.load.problems), "items": len(self.items)},
            "problems": [str(p) for p in self.load.problems],
            "excluded": self.excluded,
            "generation": self.generation,
            "judge": self.judge,
            "counts": self.extra_counts,
            "tables": contestants,
            "deviations": list(self.suite.deviations),
        }


# --- generation ---------------------------------------------------------------------------------------


def _readable(path: Path) -> bool:
    try:
        load_image(path)
        return True
    except ImageInputError:
        return False


def _check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Outputs in ``folder`` are reused only if they were made with the same model and sampling settings."""
    path = folder / SETTINGS_FILE
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise DataError(
                f"{folder}: holds outputs made with other settings ({', '.join(changed)}); "
                "pass a new --out or delete that folder"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def generate_outputs(
    pipe: Any,
    suite: Suite,
    items: Sequence[Item],
    root: Path,
    label: str,
    *,
    batch_size: int = 8,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    progress: bool = True,
) -> tuple[list[Path], dict[str, int]]:
    """The model's output path per item, generating those not on disk (item ``i`` uses seed ``seed + i``,
    so a resumed run makes the images an uninterrupted one would). ``pipe`` is a pipeline, or a model
    name to load only if an output is missing."""
    paths = [suite.output_path(root, label, item) for item in items]
    todo = [i for i, p in enumerate(paths) if not (p.exists() and _readable(p))]
    if todo and isinstance(pipe, str):  # a model name: loaded only when something is left to generate
        from uniref.pipeline import EditPipeline

        pipe = EditPipeline.from_pretrained(pipe)
    bar = tqdm(total=len(todo), desc=f"{suite.name}: generate", unit="image", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            result = pipe.generate(
                [items[i].instruction for i in chunk],
                [items[i].images for i in chunk],
                steps=steps,
                guidance=guidance,
                seed=[seed + i for i in chunk],
                progress=False,
                target_like=[image_size(suite.like(items[i])) for i in chunk],
            )
            for i, image in zip(chunk, result.images, strict=True):
                save_image(image, paths[i])
            bar.update(len(chunk))
    finally:
        bar.close()
    _write_companions(suite, items, root, label)
    return paths, {"generated": len(todo), "reused": len(items) - len(todo)}


def _write_companions(suite: Suite, items: Sequence[Item], root: Path, label: str) -> None:
    for item in items:
        for path, image in suite.companion_files(root, label, item).items():
            if not path.exists():
                save_image(image, path)


def baseline_image(name: str, suite: Suite, items: Sequence[Item], index: int) -> Image.Image | None:
    item = items[index]
    other = suite.other_output(items, index) if len(items) > 1 else None
    return trivial_output(name, item.images, suite.like(item).size, other)


def write_baselines(suite: Suite, items: Sequence[Item], root: Path) -> dict[str, list[Path]]:
    """Every applicable baseline's outputs in the benchmark's layout under ``root`` (one folder each)."""
    written: dict[str, list[Path]] = {}
    for name in BASELINES:
        if baseline_image(name, suite, items, 0) is None:
            continue  # e.g. other_target on a benchmark without right answers
        paths = []
        for i, item in enumerate(items):
            path = suite.output_path(root, name, item)
            if not path.exists():
                image = baseline_image(name, suite, items, i)
                assert image is not None
                save_image(image, path)
            paths.append(path)
        _write_companions(suite, items, root, name)
        written[name] = paths
    return written


# --- judging ------------------------------------------------------------------------------------------


def question_messages(system: str, question: Question, max_side: int | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    for label, image in question.images:
        content += [{"type": "text", "text": label}, image_part(image, max_side)]
    content.append({"type": "text", "text": question.text})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


class Judging:
    """Asks a suite's questions about one output at a time, through the cache (thread-safe)."""

    def __init__(self, suite: Suite, judge: VLMJudge, cache: JudgementCache) -> None:
        self.suite, self.judge, self.cache = suite, judge, cache
        self.asked = 0

    def key(self, item: Item, question: Question, digest: str) -> str:
        version = prompt_version(
            self.suite.system_prompt, question.template, *question.labels, f"{question.low:g}-{question.high:g}"
        )
        return self.cache.key(
            self.suite.name, self.suite.uid(item), question.name, digest, version, self.judge.config.model
        )

    def answers(self, item: Item, path: Path, digest: str) -> tuple[dict[str, list[float]] | None, dict[str, str]]:
        output = load_image(path)
        answers: dict[str, list[float]] = {}
        reasons: dict[str, str] = {}
        failed = False
        for question in self.suite.questions(item, output):
            key = self.key(item, question, digest)
            found = self.cache.get(key)
            if found is None:
                messages = question_messages(self.suite.system_prompt, question, self.judge.config.max_image_side)
                scores, text = self.judge.chat(
                    messages, len(question.labels), f"{self.suite.name} {question.name}", question.low, question.high
                )
                self.asked += 1
                found = Judgement(scores, judge_reason(text) if scores else f"unscored: {text[:300]}", text)
                self.cache.put(key, found)
            reasons[question.name] = found.reason
            if found.scores is None:
                failed = True
            else:
                answers[question.name] = found.scores
        return (None if failed else answers), reasons


# --- the run ------------------------------------------------------------------------------------------


def run_bench(
    name: str,
    data: Path,
    out: Path,
    *,
    model: str = "tiny",
    pipe: Any = None,
    judge: JudgeConfig | None = None,
    concurrency: int = 8,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    baselines: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Generate, judge and score benchmark ``name`` on ``data``; outputs and the judgement cache go under
    ``out``. ``pipe`` (default: ``EditPipeline.from_pretrained(model)``) is built only if something is
    missing on disk. Without ``judge`` only the exact suites are scored; the rest write outputs only."""
    suite = get_suite(name)
    load = LoadReport()
    items = suite.load(data, load, limit)
    if not items:
        raise DataError(f"{data}: no readable {name} samples ({len(load.problems)} bad rows of {load.rows})")
    excluded: dict[str, int] = {}
    for item in items:
        if (why := suite.excluded(item)) is not None:
            excluded[why] = excluded.get(why, 0) + 1
    label = Path(model).name if Path(model).exists() else model
    settings = {"model": model, "steps": steps, "guidance": guidance, "seed": seed, "limit": limit}
    extra_counts: dict[str, Any] = {}
    if isinstance(suite, MICoBench):
        extra_counts["W"] = load_mico_weights(items, [data / "weights", out / safe_name(label) / "weights"])

    _check_settings(out / safe_name(label), settings)
    model_paths, generation = generate_outputs(
        pipe if pipe is not None else model,
        suite,
        items,
        out,
        label,
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        guidance=guidance,
        progress=progress,
    )
    contestants = {MODEL: model_paths}
    if baselines:
        contestants |= write_baselines(suite, items, out / "baselines")

    judge_info: dict[str, Any] = {}
    reasons: dict[tuple[str, int], dict[str, str]] = {}
    answers: dict[tuple[str, int], dict[str, list[float]] | None] = {}
    if judge is not None:
        client = VLMJudge(judge)
        cache = JudgementCache(out / "judge")
        judging = Judging(suite, client, cache)
        jobs = [(c, i) for c in contestants for i, it in enumerate(items) if suite.excluded(it) is None]
        # Contestants with the same file for an item (copy_first = copy_last at K = 1) share one judgement.
        digests = {job: file_sha256(contestants[job[0]][job[1]]) for job in jobs}
        unique = {(i, digests[(c, i)]): contestants[c][i] for c, i in jobs}
        bar = tqdm(total=len(unique), desc=f"{name}: judge", unit="output", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                futures = {
                    key: pool.submit(judging.answers, items[key[0]], path, key[1]) for key, path in unique.items()
                }
                done = {}
                for key, future in futures.items():
                    done[key] = future.result()
                    bar.update(1)
            for job in jobs:
                answers[job], reasons[job] = done[(job[1], digests[job])]
        finally:
            bar.close()
            cache.close()
            client.close()
        judge_info = {
            "url": judge.base_url,
            "model": judge.model,
            "asked": judging.asked,
            "cached": cache.hits,
            "torn_cache_lines": cache.torn,
            "client": client.stats.as_dict(),
        }

    results: dict[str, list[Scored]] = {}
    for contestant, paths in contestants.items():
        scored_list = []
        for i, (item, path) in enumerate(zip(items, paths, strict=True)):
            scores = None
            if suite.excluded(item) is None and (judge is not None or suite.exact):
                given = answers.get((contestant, i), {}) if judge is not None else {}
                scores = suite.sample_scores(item, load_image(path), given)
            scored_list.append(Scored(scores, reasons.get((contestant, i), {}), str(path.relative_to(out))))
        results[contestant] = scored_list
    if judge_info:
        judge_info["unscored"] = {
            c: sum(answers.get((c, i), {}) is None for i in range(len(items))) for c in contestants
        }
    settings |= {"benchmark": name, "data": str(data), "baselines": baselines, "batch_size": batch_size}
    return BenchResult(suite, items, load, settings, results, excluded, generation, judge_info, extra_counts)
