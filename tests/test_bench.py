"""``uniref bench``: published formulas by hand, each benchmark read from its own format, a scripted judge on
127.0.0.1 (with malformed replies), resume without repeated judgements, bad rows named and counted."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench_fixtures import (
    ScriptedJudge,
    reply,
    write_gedit,
    write_imgedit,
    write_mico,
    write_omnicontext,
)
from cli_helpers import run_cli
from uniref.bench import scores as S
from uniref.bench.cache import CACHE_FILE
from uniref.bench.published import GEDIT_PQ, GEDIT_SC, MICO_PQ, MICO_SC, OMNI_PF, OMNI_SC_SCENE
from uniref.bench.report import write_reports
from uniref.bench.run import MODEL, run_bench
from uniref.errors import DataError
from uniref.pipeline import EditPipeline
from uniref.rewards.judge import JudgeConfig
from uniref.rewards.server import BackgroundServer
from uniref.rewards.sources import RetryPolicy

FAST = RetryPolicy(max_retries=1, backoff=0.0, timeout=10.0)  # two tries at most, no waiting


@pytest.fixture(scope="module")
def pipe() -> EditPipeline:
    return EditPipeline.from_pretrained("tiny-random")


def _start(template: str) -> str:
    return template[:40].replace("{instruction}", "")


@pytest.fixture
def judge() -> Iterator[tuple[ScriptedJudge, JudgeConfig]]:
    fake = ScriptedJudge(lambda text, n, body: (500, "no handler set"))
    with BackgroundServer(fake.app) as server:
        yield fake, JudgeConfig(base_url=server.url + "/v1", model="fake-vl", retry=FAST)


def _run(name: str, data: Path, out: Path, pipe: EditPipeline, judge_config: JudgeConfig | None, **kw):
    kw = {"concurrency": 2, **kw}
    return run_bench(name, data, out, model="tiny-random", pipe=pipe, judge=judge_config, steps=1, progress=False, **kw)


# --- formulas, computed by hand ------------------------------------------------------------------------


def test_published_formulas_by_hand():
    assert S.omnicontext_score(9, 4) == pytest.approx(6.0)
    mico = S.mico_score(pf=9, sr=4, naturalness=8, artifacts=2, w=0.5)  # SC 6, PQ 4
    assert mico == pytest.approx({"SC": 6.0, "PQ": 4.0, "score": 0.5 * math.sqrt(24)})
    assert S.viescore([7, 3], [8, 5]) == pytest.approx({"SC": 3.0, "PQ": 5.0, "O": math.sqrt(15)})
    assert S.imgedit_score([1, 4, 4]) == pytest.approx(3.0)
    rows = [({"t": "a"}, {"x": 1.0}), ({"t": "a"}, {"x": 3.0}), ({"t": "b"}, {"x": 6.0}), ({"t": "b"}, None)]
    table = S.group_means(rows, lambda f: f["t"])
    assert table == {"a": {"x": 2.0, "n": 2, "unscored": 0}, "b": {"x": 6.0, "n": 2, "unscored": 1}}
    assert S.mean_over_groups(table, ["x"]) == {"x": 4.0, "n": 4, "unscored": 1}  # macro: (2 + 6) / 2
    assert S.mean_over_samples(rows)["x"] == pytest.approx(10 / 3)  # micro over the scored rows


# --- OmniContext ---------------------------------------------------------------------------------------


def test_omnicontext_from_save_to_disk_scores_as_published(tmp_path, pipe, judge):
    fake, config = judge
    script = {  # instruction -> (PF, SC)
        "put the cup from image 1 on a table": (8, 2),
        "show the lamp from image 1 at night": (9, 1),
        "place the vase from image 1 in the room of image 2": (4, 9),
    }
    seen_scene = []

    def handler(text: str, n: int, body) -> tuple[int, str]:
        instruction = next(i for i in script if i in text)
        if text.startswith(_start(OMNI_SC_SCENE)) and "scene background" in text:
            seen_scene.append(instruction)
        pf, sc = script[instruction]
        return reply(pf if text.startswith(_start(OMNI_PF)) and "carries out" in text else sc)

    fake.handler = handler
    data = write_omnicontext(tmp_path / "omni")
    result = _run("omnicontext", data, tmp_path / "out", pipe, config)

    assert (tmp_path / "out/tiny-random/fullset/single_object/o1.png").exists()  # the official layout
    assert (tmp_path / "out/tiny-random/fullset/scene_object/o4.png").exists()  # generated though not scored
    assert result.excluded == {"instruction_language 'cn' (English only)": 1}
    table = result.tables(MODEL)["by task type (English)"]
    assert table["single_object"]["overall"] == pytest.approx((4 + 3) / 2)
    assert table["scene_object"]["overall"] == pytest.approx(6.0)
    assert table["overall"]["overall"] == pytest.approx((3.5 + 6.0) / 2)  # mean over task types
    assert seen_scene and set(seen_scene) == {"place the vase from image 1 in the room of image 2"}
    # 3 English samples × 2 questions × (model + copy_first, copy_last, grey), the Chinese one never judged;
    # at K = 1 copy_last is the same file as copy_first, and the two share their 2 × 2 judgements.
    assert fake.calls == 3 * 2 * 4 - 4 == result.judge["asked"]
    assert set(result.results) == {MODEL, "copy_first", "copy_last", "grey"}  # no right answers: no other_target
    report_json, report_md, report_html = write_reports(result, tmp_path / "out")
    md = report_md.read_text()
    assert "| overall | 3 | 0 |" in md and "| baseline: grey |" in md and "random.randint" in md
    assert "scripted" in report_html.read_text()  # the judge's reasons beside the thumbnails
    assert json.loads(report_json.read_text())["samples"][3]["scores"] is None  # the excluded Chinese row


def test_omnicontext_malformed_replies_are_retried_then_unscored_never_guessed(tmp_path, pipe, judge):
    fake, config = judge
    tries: dict[str, int] = {}

    def handler(text: str, n: int, body) -> tuple[int, str]:
        tries[text] = tries.get(text, 0) + 1
        if "lamp" in text:
            return 200, "The image is lovely."  # never parses
        if "cup" in text and tries[text] == 1:
            return 200, '{"score": 12}'  # out of range once, then fine
        return reply(6)

    fake.handler = handler
    result = _run("omnicontext", write_omnicontext(tmp_path / "omni"), tmp_path / "out", pipe, config, baselines=False)
    by_key = {item.key: scored for item, scored in zip(result.items, result.results[MODEL], strict=True)}
    assert by_key["o1"].scores == {"PF": 6, "SC": 6, "overall": pytest.approx(6.0)}
    assert by_key["o2"].scores is None and "unscored" in by_key["o2"].reasons["PF"]
    table = result.tables(MODEL)["by task type (English)"]
    assert table["single_object"]["unscored"] == 1 and table["single_object"]["overall"] == pytest.approx(6.0)
    assert result.judge["unscored"] == {MODEL: 1}


def test_killed_run_resumes_without_repeating_a_judgement(tmp_path, pipe, judge):
    fake, config = judge
    fake.handler = lambda text, n, body: reply(7)
    data, out = write_omnicontext(tmp_path / "omni"), tmp_path / "out"
    first = _run("omnicontext", data, out, pipe, config)
    calls = fake.calls
    assert first.generation == {"generated": 4, "reused": 0}

    # A kill mid-write leaves a torn last line; the judgement it held is the only one asked again.
    cache = out / "judge" / CACHE_FILE
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    again = _run("omnicontext", data, out, pipe, config)
    assert fake.calls == calls + 1 and again.judge["asked"] == 1 and again.judge["torn_cache_lines"] == 1
    assert again.generation == {"generated": 0, "reused": 4}
    assert again.tables(MODEL) == first.tables(MODEL)

    third = _run("omnicontext", data, out, pipe, config)
    assert third.judge["asked"] == 0 and fake.calls == calls + 1
    with pytest.raises(DataError, match="other settings"):  # outputs of other settings are never mixed in
        run_bench("omnicontext", data, out, model="tiny-random", pipe=pipe, steps=2, progress=False)


# --- GEdit-Bench ---------------------------------------------------------------------------------------


def test_gedit_from_parquet_viescore_per_language_and_intersection(tmp_path, pipe, judge):
    fake, config = judge
    script = {
        "make the car red": ((7, 3), (8, 5)),
        "make the sky green": ((9, 9), (4, 6)),
        "add a dog": ((2, 8), (9, 9)),
        "把车变成红色": ((5, 5), (5, 5)),
    }

    last = [""]

    def handler(text: str, n: int, body) -> tuple[int, str]:
        # PQ shows the output alone; one call at a time, it follows the SC call of its own sample.
        if text.startswith(_start(GEDIT_SC)):
            last[0] = next(i for i in script if i in text)
            return reply(*script[last[0]][0])
        assert text.startswith(_start(GEDIT_PQ))
        return reply(*script[last[0]][1])

    fake.handler = handler
    gedit = write_gedit(tmp_path / "gedit")
    result = _run("gedit", gedit, tmp_path / "out", pipe, config, concurrency=1, baselines=False)
    assert (tmp_path / "out/tiny-random/fullset/color_alter/en/g1.png").exists()
    assert (tmp_path / "out/tiny-random/fullset/color_alter/en/g1_SRCIMG.png").exists()  # the scorer needs it
    assert (tmp_path / "out/tiny-random/fullset/color_alter/cn/g1.png").exists()  # same key, other language
    tables = result.tables(MODEL)
    en = tables["GEdit-Bench-EN"]
    o1, o2, o3 = math.sqrt(3 * 5), math.sqrt(9 * 4), math.sqrt(2 * 9)
    assert en["color_alter"]["O"] == pytest.approx((o1 + o2) / 2)
    assert en["overall"]["O"] == pytest.approx(((o1 + o2) / 2 + o3) / 2)
    assert tables["GEdit-Bench-EN intersection"]["overall"]["O"] == pytest.approx((o1 + o3) / 2)
    assert tables["GEdit-Bench-CN"]["overall"]["O"] == pytest.approx(5.0)


# --- MICo-Bench ----------------------------------------------------------------------------------------


def test_mico_from_jsonl_uses_weights_file_and_counts_missing_weights(tmp_path, pipe, judge):
    fake, config = judge
    shown_images = []

    def handler(text: str, n: int, body) -> tuple[int, str]:
        shown_images.append(n)
        if text.startswith(_start(MICO_SC)):
            assert "photorealistic" in text or "holds the cup" in text  # De&Re judged on refined_prompt
            return reply(9, 4)  # PF, SR -> SC 6
        assert text.startswith(_start(MICO_PQ))
        return reply(8, 2)  # naturalness, artifacts -> PQ 4

    fake.handler = handler
    result = _run("mico", write_mico(tmp_path / "mico"), tmp_path / "out", pipe, config, baselines=False)
    assert result.extra_counts["W"] == {"from file": 1, "missing": 1}
    assert set(shown_images) == {1, 2}  # SC: reference + output; PQ: the output alone; never the K inputs
    by_key = {item.key: s.scores for item, s in zip(result.items, result.results[MODEL], strict=True)}
    assert by_key["0"]["score"] == pytest.approx(0.5 * math.sqrt(24)) and by_key["0"]["W"] == 0.5
    assert by_key["2"]["score"] == pytest.approx(math.sqrt(24)) and by_key["2"]["W_missing"] == 1.0
    assert by_key["2"]["score_product"] == pytest.approx(24.0)
    assert (tmp_path / "out/tiny-random/DeRe/2.png").exists()
    overall = result.tables(MODEL)["by task"]["overall"]
    assert overall["score"] == pytest.approx((0.5 * math.sqrt(24) + math.sqrt(24)) / 2)


# --- ImgEdit -------------------------------------------------------------------------------------------


def test_imgedit_bad_rows_named_and_counted_alter_uses_adjust_rubric(tmp_path, pipe, judge):
    fake, config = judge
    rubrics = []

    def handler(text: str, n: int, body) -> tuple[int, str]:
        rubrics.append(text)
        if "style" in text:
            return reply(5, 0, 2)  # 0 is outside 1-5: unparsable, retried, unscored
        return reply(1, 4, 4)

    fake.handler = handler
    result = _run("imgedit", write_imgedit(tmp_path / "imgedit"), tmp_path / "out", pipe, config, baselines=False)
    problems = {str(p) for p in result.load.problems}
    assert result.load.rows == 5 and len(problems) == 2
    assert any("'prompt'" in p for p in problems) and any("missing.png" in p for p in problems)
    assert any("'adjust' edit" in t and "Visual Seamlessness" in t for t in rubrics)
    table = result.tables(MODEL)["by edit type"]
    assert table["add"]["score"] == pytest.approx(3.0) and table["alter"]["score"] == pytest.approx(3.0)
    assert table["style"]["unscored"] == 1 and "score" not in table["style"]
    assert table["overall"]["score"] == pytest.approx(3.0) and table["overall"]["unscored"] == 1
    assert (tmp_path / "out/tiny-random/22.png").exists()


# --- scenes and the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory) -> Path:
    from uniref.data.formats import JsonlWriter
    from uniref.data.splits import split_samples
    from uniref.data.tasks import SizeRange, TaskConfig

    folder = tmp_path_factory.mktemp("scenes")
    writer = JsonlWriter(folder)
    for i, sample in enumerate(split_samples("test", 4, TaskConfig(max_refs=3, size_range=SizeRange(32, 64)))):
        writer.add(sample, f"{i:03d}")
    writer.close()
    return folder


def test_scenes_bench_on_the_shipped_model_end_to_end(tmp_path, scene_data, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        [
            "bench",
            "scenes",
            "--data",
            str(scene_data),
            "--out",
            str(out),
            "--model",
            "tiny",
            "--steps",
            "2",
            "--no-progress",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    overall = summary["tables"][MODEL]["by task"]["overall"]
    assert overall["n"] == 4 and 0.0 <= overall["overall"] <= 1.0
    assert set(summary["tables"]) == {MODEL, "copy_first", "copy_last", "grey", "other_target"}
    assert summary["tables"]["other_target"]["by task"]["overall"]["overall"] < 0.25
    assert "judge" in summary and summary["judge"] == {}
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") >= 4 * 2  # references and output thumbnails, inline


def test_scenes_judged_scores_sit_beside_exact_ones(tmp_path, scene_data, pipe, judge):
    fake, config = judge
    fake.handler = lambda text, n, body: (
        (200, '{"scores": [' + ", ".join(["8"] * (n - 1)) + "]}") if "per-reference" in text else reply(5)
    )
    result = _run("scenes", scene_data, tmp_path / "out", pipe, config, baselines=False)
    overall = result.tables(MODEL)["by task"]["overall"]
    assert overall["judged_overall"] == pytest.approx(math.sqrt(0.5 * 0.8))
    assert "overall" in overall and overall["judge_unscored"] == 0.0
    md = (write_reports(result, tmp_path / "out")[1]).read_text()
    assert "judged_overall" in md and "Where we differ" in md


def test_bench_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["bench", "nosuch", "--data", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "unknown benchmark 'nosuch'" in err
    code, _, err = run_cli(
        ["bench", "gedit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "no such benchmark" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        ["bench", "imgedit", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "not a benchmark" in err


def _omni_as(layout: str, tmp_path: Path) -> Path:
    """The OmniContext fixture as save_to_disk, parquet, or JSONL + image files (plus one broken line)."""
    import datasets

    saved = write_omnicontext(tmp_path / "saved")
    if layout == "save_to_disk":
        return saved
    dataset = datasets.load_from_disk(str(saved))
    if layout == "parquet":
        (tmp_path / "pq" / "data").mkdir(parents=True)
        dataset.to_parquet(str(tmp_path / "pq" / "data" / "train-00000.parquet"))
        return tmp_path / "pq"
    folder = tmp_path / "repo"
    lines = []
    for row in dataset:
        paths = []
        for i, image in enumerate(row["input_images"]):
            (folder / "images").mkdir(parents=True, exist_ok=True)
            image.save(folder / "images" / f"{row['key']}_{i}.png")
            paths.append(f"images/{row['key']}_{i}.png")
        lines.append(json.dumps({**row, "input_images": paths}))
    lines.append('{"key": "broken", ')
    (folder / "omnicontext.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "jsonl"])
def test_one_benchmark_reads_the_same_from_every_layout(tmp_path, layout):
    from uniref.bench.run import get_suite
    from uniref.data.formats import LoadReport

    report = LoadReport()
    items = get_suite("omnicontext").load(_omni_as(layout, tmp_path), report)
    assert [(it.key, it.task_type, it.language, it.k) for it in items] == [
        ("o1", "single_object", "en", 1),
        ("o2", "single_object", "en", 1),
        ("o3", "scene_object", "en", 2),
        ("o4", "scene_object", "cn", 2),
    ]
    assert items[2].images[1].size == (48, 32)
    problems = [str(p) for p in report.problems]
    assert problems == (
        ["row 5: omnicontext.jsonl: invalid JSON (Expecting property name enclosed in double quotes)"]
        if layout == "jsonl"
        else []
    )
