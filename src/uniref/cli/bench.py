"""``uniref bench NAME``: generate and score a published benchmark (or the scene world) reproducibly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uniref.cli import app, fail, warnings_to_stderr
from uniref.errors import DataError


@app.command("bench")
def bench_command(
    name: Annotated[str, typer.Argument(help="omnicontext, mico, gedit, imgedit or scenes")],
    data: Annotated[Path, typer.Option(help="the benchmark: save_to_disk folder, parquet, or JSON/JSONL + images")],
    out: Annotated[Path, typer.Option(help="outputs (in the benchmark's layout), judge cache and reports")],
    model: Annotated[str, typer.Option(help="tiny (embedded default), tiny-random, or a model folder")] = "tiny",
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible judge root, e.g. http://127.0.0.1:8001/v1 (vLLM)")
    ] = None,
    judge_model: Annotated[str, typer.Option(help="the judge's served model name")] = "Qwen/Qwen2.5-VL-72B-Instruct",
    judge_timeout: Annotated[float, typer.Option(min=1, help="seconds per judge call")] = 120.0,
    judge_retries: Annotated[int, typer.Option(min=0, help="retries of a failed or unparsable judge call")] = 3,
    concurrency: Annotated[int, typer.Option(min=1, help="judge calls in flight")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N good samples")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="samples per pipeline call (SELF packs mixed K)")] = 8,
    seed: Annotated[int, typer.Option(help="noise seed of sample 0 (sample i uses seed + i)")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="denoising steps; default: the model's")] = None,
    guidance: Annotated[float | None, typer.Option(help="true-CFG scale; default: the model's")] = None,
    baselines: Annotated[
        bool, typer.Option(help="also score copy_first, copy_last, grey and (where possible) other_target")
    ] = True,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (the summary)")] = False,
) -> None:
    """Generate every sample's output in the benchmark's own layout, judge it (cached: a killed run resumes),
    score it with the published formula, and write report.md, report.html and report.json."""
    try:
        from uniref.bench.report import to_markdown, write_reports
        from uniref.bench.run import get_suite, run_bench
        from uniref.rewards.judge import JudgeConfig
        from uniref.rewards.sources import RetryPolicy
    except ModuleNotFoundError as exc:
        raise fail(f"uniref bench needs {exc.name}: pip install 'uniref[bench]'") from None

    get_suite(name)  # an unknown name fails before anything is loaded
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder")
    judge = None
    if judge_url is not None:
        judge = JudgeConfig(
            base_url=judge_url,
            model=judge_model,
            concurrency=concurrency,
            retry=RetryPolicy(max_retries=judge_retries, timeout=judge_timeout),
        )
    with warnings_to_stderr():
        result = run_bench(
            name,
            data,
            out,
            model=model,
            judge=judge,
            concurrency=concurrency,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            steps=steps,
            guidance=guidance,
            baselines=baselines,
            progress=progress,
        )
    for problem in result.load.problems:
        typer.echo(f"bad {problem}", err=True)
    if result.load.problems:
        typer.echo(f"{len(result.load.problems)} bad rows of {result.load.rows} skipped", err=True)
    written = write_reports(result, out)
    if as_json:
        typer.echo(json.dumps(result.summary(), default=str))
    else:
        typer.echo(to_markdown(result))
        typer.echo("wrote " + ", ".join(str(p) for p in written))
