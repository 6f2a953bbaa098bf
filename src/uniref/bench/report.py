"""``report.md``, a self-contained ``report.html`` (thumbnails inline) and ``report.json`` of a bench run."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from uniref.bench.run import MODEL, BenchResult
from uniref.images import atomic_path, load_image

REPORT_MD, REPORT_HTML, REPORT_JSON = "report.md", "report.html", "report.json"
THUMB = 128  # px, long side of a thumbnail
HTML_ROWS = 300  # samples shown in the HTML (the JSON has them all)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(
    title: str, table: dict[Any, dict[str, float]], metrics: tuple[str, ...], extra: dict[str, dict]
) -> list[str]:
    """Markdown rows: the groups, then each baseline's ``overall`` row beside the model's."""
    shown = [m for m in metrics if any(m in row for row in [*table.values(), *extra.values()])]
    lines = [f"### {title}", "", "| group | n | unscored | " + " | ".join(shown) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(shown))
    for group, row in [*table.items(), *extra.items()]:
        values = " | ".join(_fmt(row.get(m, float("nan"))) for m in shown)
        lines.append(f"| {group} | {row.get('n', 0)} | {row.get('unscored', 0)} | {values} |")
    return lines + [""]


def to_markdown(result: BenchResult) -> str:
    suite = result.suite
    s = result.summary()
    parts = [f"# uniref bench {suite.name}", ""]
    parts.append("Settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()))
    parts.append("")
    rows = s["rows"]
    parts.append(f"Rows read {rows['read']}, bad {rows['bad']} (listed below), samples {rows['items']}.")
    if result.excluded:
        parts.append("Generated but not in the score: " + "; ".join(f"{n} × {w}" for w, n in result.excluded.items()))
    gen = result.generation
    parts.append(f"Outputs: {gen['generated']} generated, {gen['reused']} reused from an earlier run.")
    if result.judge:
        j = result.judge
        parts.append(
            f"Judge {j['model']} at {j['url']}: {j['asked']} calls asked, {j['cached']} answers from the cache; "
            f"unscored outputs {j['unscored']}; client {j['client']}."
        )
    elif not suite.exact:
        parts.append("No judge given (--judge-url): outputs are written, nothing is scored.")
    for name, counts in result.extra_counts.items():
        parts.append(f"{name}: {counts}")
    parts.append("")
    if result.judged:
        model_tables = result.tables(MODEL)
        baseline_tables = {b: result.tables(b) for b in result.results if b != MODEL}
        for title, table in model_tables.items():
            overall_key = "overall" if "overall" in table else None
            extra = {
                f"baseline: {b}": tables[title][overall_key]
                for b, tables in baseline_tables.items()
                if overall_key and overall_key in tables.get(title, {})
            }
            if not overall_key:  # a by-K table: every baseline's rows by K
                extra = {f"{k} · {b}": row for b, tables in baseline_tables.items() for k, row in tables[title].items()}
            parts += _table(title, table, suite.metrics, extra)
    parts += ["## Where we differ from the official scripts", ""] + [f"- {d}" for d in suite.deviations] + [""]
    if result.load.problems:
        parts += ["## Bad rows", ""] + [f"- {p}" for p in result.load.problems] + [""]
    return "\n".join(parts)


def _thumb(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def to_html(result: BenchResult, out: Path) -> str:
    """references | output | scores and the judge's reasons, per sample of the model (first HTML_ROWS)."""
    suite = result.suite
    head = (
        f"<!doctype html><meta charset='utf-8'><title>uniref bench {html.escape(suite.name)}</title><style>"
        "body{font:14px sans-serif;margin:1.5em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top} img{margin:1px} .r{max-width:36em;font-size:12px;color:#444}"
        f"</style><h1>uniref bench {html.escape(suite.name)}</h1><pre>{html.escape(to_markdown(result))}</pre>"
    )
    rows = ["<h2>Samples</h2><table><tr><th>#</th><th>references</th><th>output</th><th>scores</th><th>judge</th></tr>"]
    for i, (item, scored) in enumerate(zip(result.items, result.results[MODEL], strict=True)):
        if i >= HTML_ROWS:
            rows.append(f"<tr><td colspan=5>… {len(result.items) - HTML_ROWS} more in report.json</td></tr>")
            break
        refs = "".join(f"<img src='{_thumb(img)}' title='picture {j + 1}'>" for j, img in enumerate(item.images))
        output = f"<img src='{_thumb(load_image(out / scored.path))}'>"
        if scored.scores is None:
            scores = "excluded" if suite.excluded(item) else "unscored"
        else:
            scores = "<br>".join(f"{html.escape(k)} {_fmt(v)}" for k, v in scored.scores.items())
        reasons = "<br>".join(f"<b>{html.escape(q)}</b>: {html.escape(r)}" for q, r in scored.reasons.items())
        title = html.escape(f"{item.key} [{item.task_type}] {item.instruction}")
        rows.append(
            f"<tr><td>{title}</td><td>{refs}</td><td>{output}</td><td>{scores}</td><td class=r>{reasons}</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def write_reports(result: BenchResult, out: Path) -> list[Path]:
    summary = result.summary()
    samples = [
        {
            **item.fields(),
            "instruction": item.instruction,
            "output": scored.path,
            "scores": scored.scores,
            "reasons": scored.reasons,
        }
        for item, scored in zip(result.items, result.results[MODEL], strict=True)
    ]
    written = []
    for name, text in (
        (REPORT_JSON, json.dumps({**summary, "samples": samples}, indent=1, default=str)),
        (REPORT_MD, to_markdown(result)),
        (REPORT_HTML, to_html(result, out)),
    ):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
