"""Load, soak and batching benchmark of ``uniref serve`` (127.0.0.1 only; bounded in count and time).

Starts ``uniref serve`` as a subprocess (the load generator's threads never share its GIL) and measures:

1. **load**: ``--requests`` edits from ``--clients`` concurrent clients, mixed K = 1..6 and sizes:
   statuses (only clean 429s, which carry ``Retry-After``, are allowed besides 200), p50/p95
   latency, throughput;
2. **soak**: the server's resident memory before and after ``--bad`` bad requests (the CLI's corpus:
   empty, truncated, not an image, a decompression bomb; and bad fields);
3. **batching**: throughput at concurrency ``--compare-clients`` with ``--max-batch 8`` vs
   ``--max-batch 1``, alternating the two servers for ``--rounds`` rounds in the same run (vllm-omni's
   batching PR measured 1.36x at batch 8).

    python -m benchmarks.bench_serve                           # full run; writes docs/benchmarks.md
    python -m benchmarks.bench_serve --requests 20 --clients 4 --compare-requests 8 --bad 20 --no-write
    python -m benchmarks.bench_serve --screenshot docs/serving_page.png   # the page, in Debian's chromium

The full run wants an idle machine: on a busy one it measures the other load as much as the server.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks._report import markdown_table, write_section
from benchmarks._timing import ROOT, cpu_name

PROMPTS = [
    "make it red",
    "put the red circle from picture 2 on the background of picture 1",
    "put the blue square from picture 3 and the red circle from picture 2 on the background of picture 1",
    "move the circle to the left",
]
# Reference sizes people upload, scaled down to the tiny model's world (it plans them under 64²).
SIZES = [(32, 24), (24, 32), (48, 48), (64, 36), (20, 20), (80, 40), (40, 60)]
VLLM_OMNI_BATCH8 = 1.36  # vllm-omni's batching PR: throughput at batch 8 over batch 1
STARTUP_TIMEOUT = 120.0  # seconds for a server subprocess to answer /healthz
REQUEST_TIMEOUT = 300.0  # seconds per request: far more than any should take


def _png(width: int, height: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def edit_request(i: int) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, str]]:
    """Request ``i`` of the mix: K = 1..6 references of random sizes, one of the prompts."""
    rng = random.Random(i)
    k = rng.randint(1, 6)
    refs = [_png(*rng.choice(SIZES), seed=i * 10 + j) for j in range(k)]
    form = [("image", (f"ref{j + 1}.png", data, "image/png")) for j, data in enumerate(refs)]
    return form, {"prompt": rng.choice(PROMPTS), "seed": str(i)}


def bad_requests() -> list[tuple[list, dict[str, str]]]:
    """The bad-input corpus: files the CLI refuses, and fields the server refuses."""
    good = _png(16, 16, 0)
    cut = _png(64, 64, 1)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
        for k, d in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0")), (b"IEND", b""))
    )
    files = [b"", cut[: len(cut) // 2], b"not an image", bomb]
    out: list[tuple[list, dict[str, str]]] = [
        ([("image", ("bad.png", data, "image/png"))], {"prompt": "make it red"}) for data in files
    ]
    one = [("image", ("good.png", good, "image/png"))]
    for fields in (
        {"prompt": ""},
        {"prompt": "x", "steps": "0"},
        {"prompt": "x", "size": "big"},
        {"prompt": "x" * 5000},
    ):
        out.append((one, fields))
    return out


# --- the server subprocess --------------------------------------------------------------------------


class Server:
    """``uniref serve`` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, model: str, max_batch: int, steps_env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "uniref", "serve", "--model", model, "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"]
        env = os.environ | {"PYTHONPATH": str(ROOT / "src")} | (steps_env or {})
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uniref serve did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc (Linux only)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- load -------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    unclean_429: int = 0  # 429s without Retry-After or a JSON error body
    wall: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in (200, 429)) + self.unclean_429

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def run_load(url: str, requests: list[int], clients: int, steps: int, deadline: float) -> LoadResult:
    """Send edit ``requests`` (indices into the mix) from ``clients`` threads; stop issuing at ``deadline``."""
    result = LoadResult()
    lock = threading.Lock()
    todo = list(requests)
    bodies = {i: edit_request(i) for i in requests}

    def client() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            while time.monotonic() < deadline:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                form, data = bodies[i]
                start = time.monotonic()
                try:
                    r = http.post(url + "/v1/images/edits", files=form, data=data | {"steps": str(steps)})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                elapsed = time.monotonic() - start
                with lock:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == 200:
                        result.latencies.append(elapsed)
                        result.batch_sizes.append(r.json()["uniref"]["batch_size"])
                    elif status == 429 and ("Retry-After" not in r.headers or "error" not in r.json()):
                        result.unclean_429 += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall = time.monotonic() - start
    return result


def soak(server: Server, n: int) -> tuple[float, float, dict[int, int]]:
    """RSS (MiB) before and after ``n`` bad requests, and their statuses."""
    corpus = bad_requests()
    statuses: dict[int, int] = {}
    before = server.rss_mib()
    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
        for i in range(n):
            form, data = corpus[i % len(corpus)]
            status = http.post(server.url + "/v1/images/edits", files=form, data=data).status_code
            statuses[status] = statuses.get(status, 0) + 1
    return before, server.rss_mib(), statuses


def compare_batching(
    model: str, n: int, clients: int, steps: int, rounds: int, seconds: float
) -> dict[int, list[float]]:
    """Throughput (requests/s) per round with --max-batch 8 and 1, alternating which goes first."""
    out: dict[int, list[float]] = {8: [], 1: []}
    for r in range(rounds):
        for max_batch in (8, 1) if r % 2 == 0 else (1, 8):
            server = Server(model, max_batch)
            try:
                warm = time.monotonic() + seconds
                run_load(server.url, list(range(1000, 1000 + clients)), clients, steps, warm)
                res = run_load(server.url, list(range(2000, 2000 + n)), clients, steps, time.monotonic() + seconds)
            finally:
                server.stop()
            out[max_batch].append(res.ok / res.wall if res.wall else 0.0)
    return out


def pipeline_batching(model: str, n: int, steps: int, rounds: int) -> dict[int, list[float]]:
    """Edits/s of the pipeline itself (no server) on the same request mix, ``n`` per arm, in calls of 8
    vs 1, alternating: how much of the server's batching gain the model's compute can give at all."""
    from uniref.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(model)
    requests = []
    for i in range(n):
        form, fields = edit_request(i)
        requests.append((fields["prompt"], [Image.open(io.BytesIO(f[1][1])).convert("RGB") for f in form], i))
    pipe.generate([requests[0][0]], [requests[0][1]], steps=steps, progress=False)  # warm-up
    out: dict[int, list[float]] = {8: [], 1: []}
    for _ in range(rounds):
        for batch in (8, 1):
            start = time.perf_counter()
            for s in range(0, n, batch):
                chunk = requests[s : s + batch]
                pipe.generate(
                    [c[0] for c in chunk],
                    [c[1] for c in chunk],
                    steps=steps,
                    seed=[c[2] for c in chunk],
                    progress=False,
                )
            out[batch].append(n / (time.perf_counter() - start))
    return out


def report(
    args: argparse.Namespace,
    load: LoadResult,
    rss: tuple[float, float, dict[int, int]],
    cmp: dict,
    in_process: dict[int, list[float]],
) -> str:
    before, after, bad_statuses = rss
    speedups = [a / b for a, b in zip(cmp[8], cmp[1], strict=True) if b > 0]
    speedup = statistics.median(speedups) if speedups else float("nan")
    in_speedup = statistics.median(a / b for a, b in zip(in_process[8], in_process[1], strict=True))
    per_request_server = 1 / statistics.median(cmp[1]) if cmp[1] else float("nan")
    overhead_ms = 1000 * (per_request_server - 1 / statistics.median(in_process[1]))
    rows = [
        ["requests sent (clients)", f"{sum(load.statuses.values())} ({args.clients})"],
        ["statuses", ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))],
        ["errors other than clean 429", load.errors],
        ["latency p50 / p95", f"{load.percentile(0.5):.2f} s / {load.percentile(0.95):.2f} s"],
        ["throughput", f"{load.ok / load.wall:.2f} edits/s" if load.wall else "n/a"],
        [
            "mean batch size (samples per call)",
            f"{statistics.mean(load.batch_sizes):.1f}" if load.batch_sizes else "n/a",
        ],
        [f"RSS before / after {args.bad} bad requests", f"{before:.0f} / {after:.0f} MiB ({after / before - 1:+.1%})"],
        ["bad-request statuses", ", ".join(f"{s}: {n}" for s, n in sorted(bad_statuses.items()))],
    ]
    cmp_rows = [
        [f"--max-batch {b}", ", ".join(f"{x:.2f}" for x in cmp[b]), f"{statistics.median(cmp[b]):.2f}"]
        for b in (8, 1)
        if cmp[b]
    ]
    return "\n\n".join(
        [
            "## `uniref serve` under load (`benchmarks/bench_serve.py`)",
            f"Model `{args.model}`, {args.steps} steps, K = 1–6 mixed sizes, 127.0.0.1, on {cpu_name()} "
            f"({os.cpu_count()} cores).",
            markdown_table(["load and soak", "value"], rows),
            f"Batching at concurrency {args.compare_clients}, {args.compare_requests} requests per arm and round, "
            f"{args.rounds} alternating rounds (edits/s):",
            markdown_table(["server", "per round", "median"], cmp_rows),
            f"Speed-up of batching (median of paired rounds): **{speedup:.2f}×** "
            f"(vllm-omni's batching PR: {VLLM_OMNI_BATCH8}× at batch 8).",
            "The pipeline alone (no server), same request mix and steps, calls of 8 vs 1 in the same run "
            f"(edits/s): {', '.join(f'{x:.2f}' for x in in_process[8])} vs "
            f"{', '.join(f'{x:.2f}' for x in in_process[1])}, **{in_speedup:.2f}×**: on this CPU the tiny "
            "model's batch-1 forward already keeps both cores busy, so the model itself gains almost nothing "
            f"from a batch. The server at --max-batch 1 spends {overhead_ms:.0f} ms more per request than the "
            "pipeline alone (the HTTP round trip, multipart and PNG work, the load generator sharing the "
            "cores); that is the part a batch shares, and where the server's gain comes from here.",
        ]
    )


def screenshot(path: Path, model: str) -> None:
    """Drive the page in Debian's chromium (two references, run) and save a screenshot to ``path``."""
    from playwright.sync_api import sync_playwright

    from uniref.pipeline import EditPipeline
    from uniref.serve import ServeConfig, ServerThread, create_app

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    examples = ROOT / "examples"
    refs = [examples / "background.png", examples / "red_circle.png", examples / "blue_square.png"]
    app = create_app(EditPipeline.from_pretrained(model), ServeConfig(model_name=model))
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with ServerThread(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(server.url + "/")
        page.set_input_files("#file-input", [str(p) for p in refs])
        page.fill(
            "#prompt",
            "put the red circle from picture 2 and the blue square from picture 3 on the background of picture 1",
        )
        page.click("#run")
        page.locator("#result-img").wait_for(state="visible", timeout=120_000)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per edit")
    parser.add_argument("--requests", type=int, default=300, help="edits in the load phase")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients in the load phase")
    parser.add_argument("--bad", type=int, default=500, help="bad requests in the soak phase")
    parser.add_argument("--compare-requests", type=int, default=64, help="edits per arm and round (batching)")
    parser.add_argument("--compare-clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of --max-batch 8 vs 1")
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=600,
        help="each phase (load, and every batching arm) stops issuing after this",
    )
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--screenshot", type=Path, help="only take a screenshot of the page to this PNG")
    args = parser.parse_args()
    if args.screenshot is not None:
        screenshot(args.screenshot, args.model)
        return
    server = Server(args.model, max_batch=8)
    try:
        deadline = time.monotonic() + args.phase_seconds
        load = run_load(server.url, list(range(args.requests)), args.clients, args.steps, deadline)
        rss = soak(server, args.bad)
    finally:
        server.stop()
    cmp = compare_batching(
        args.model, args.compare_requests, args.compare_clients, args.steps, args.rounds, args.phase_seconds
    )
    in_process = pipeline_batching(args.model, args.compare_requests, args.steps, args.rounds)
    text = report(args, load, rss, cmp, in_process)
    if args.no_write:
        print(text)
    else:
        write_section("serve", text)
        print(text)


if __name__ == "__main__":
    main()
