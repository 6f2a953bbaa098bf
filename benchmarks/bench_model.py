"""Model-path timings, measured as side-by-side ratios on this CPU.

1. SELF vs per-image on a mid-size random ``QwenImageTransformer2DModel`` (real latent channels,
   patching, head dim and RoPE axes; 2 layers of 2 heads): K = 1..6 references of mixed real aspect
   ratios at a 1024² budget, ``global`` (all references jointly under 1024²) vs ``per_image``
   (each reference its own 1024², as diffusers), both with a 1024² target. Image and text tokens, one
   denoiser call, and our pipeline end to end (tiny Qwen2.5-VL encoder, a linear patch codec with
   the Qwen VAE's geometry in place of the VAE, few steps, CFG off), plus the FLOPs ratio the same
   token counts give at the real Qwen-Image dims.
2. Our ``EditPipeline`` vs diffusers' ``QwenImageEditPlusPipeline``: the same tiny random weights
   (``tests/qwen_tiny.py``), K = 1, ``per_image``, same steps, CFG, seed and sizes.
3. The tiny flavour (``tiny-random``): a cold ``uniref edit`` process, start to exit, and a warm
   ``pipe.generate`` call, K = 1, 3, 6, on the example references, default steps.

The machine may be shared (a training run using the cores), so the arms of each comparison run
interleaved (A, B, B, A, ...) in one process, several times, and the tables give medians and the
median of the paired ratios. On busy cores use ``--threads 1``: one torch thread per core then
makes every small op wait for a descheduled thread (the section reports by how much).

    python -m benchmarks.bench_model --threads 1   # about 9 min; writes its section of docs/benchmarks.md
    python -m benchmarks.bench_model --quick       # about 2 min, fewer K and repeats; prints only
    python -m benchmarks.bench_model --save r.json # keep the raw timings; --load r.json re-renders them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks._report import markdown_table, write_section
from benchmarks._timing import alternate, cpu_name, load_qwen_tiny, median, timed
from benchmarks.bench_model_mid import MID_TRANSFORMER, MID_WIDTH, REF_SIZES, bench_mid, mid_goals_text, mid_section
from uniref.budget import Size
from uniref.pipeline import EditPipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# --- 2. vs diffusers --------------------------------------------------------------------------
# (per-reference VAE side, per-reference VL side, target side): the parity tests' scale, then larger.
DIFFUSERS_CASES = [(64, 56, 64), (256, 112, 256)]
DIFFUSERS_STEPS = 10
DIFFUSERS_GUIDANCE = 4.0
DIFFUSERS_PROMPT = "make the red circle blue"
DIFFUSERS_NEGATIVE = " "
GOAL_VS_DIFFUSERS = 1.0  # our time over diffusers' time, at most (issue 4, item 6)

# --- 3. tiny flavour --------------------------------------------------------------------------
EXAMPLE_FILES = ["background.png", "red_circle.png", "blue_square.png"]
TINY_PROMPTS = {
    1: "change the background to a diagonal gradient from sage to slate",
    3: "put the red circle from picture 2 on the left and the blue square from picture 3 on the right "
    "on the background of picture 1",
    6: "put the red circle from picture 2 on the left, the blue square from picture 3 on the right, "
    "the red circle from picture 5 at the top and the blue square from picture 6 at the bottom on the "
    "background of picture 4",
}


@dataclass(frozen=True)
class Settings:
    ks: tuple[int, ...]  # K for the mid-size sweep
    forward_repeats: int
    e2e_steps: int
    e2e_repeats: int
    growth_repeats: int  # extra global K=1 / K=max forward pairs
    growth_e2e_repeats: int  # extra global K=1 / K=max end-to-end pairs
    vae_probe: bool  # time diffusers' VAE architecture once at 1024²
    diffusers_cases: tuple[tuple[int, int, int], ...]
    diffusers_repeats: int
    tiny_ks: tuple[int, ...]
    tiny_repeats: int


FULL = Settings((1, 2, 3, 4, 5, 6), 2, 2, 1, 3, 2, True, tuple(DIFFUSERS_CASES), 5, (1, 3, 6), 3)
QUICK = Settings((1, 6), 1, 1, 1, 1, 1, False, tuple(DIFFUSERS_CASES[:1]), 2, (1, 6), 1)


# --- 2. our pipeline vs diffusers' QwenImageEditPlusPipeline ----------------------------------


@contextmanager
def diffusers_sizes(vae_side: int, condition_side: int) -> Iterator[None]:
    """Shrink diffusers' per-image budgets (module constants, as the parity tests do), then restore."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qie

    saved = qie.VAE_IMAGE_SIZE, qie.CONDITION_IMAGE_SIZE
    qie.VAE_IMAGE_SIZE, qie.CONDITION_IMAGE_SIZE = vae_side * vae_side, condition_side * condition_side
    try:
        yield
    finally:
        qie.VAE_IMAGE_SIZE, qie.CONDITION_IMAGE_SIZE = saved


def bench_diffusers(settings: Settings, qwen_tiny: ModuleType) -> list[dict[str, Any]]:
    components = qwen_tiny.build_components(seed=0)
    theirs = qwen_tiny.diffusers_pipeline(components)
    ref = Image.open(EXAMPLES / "red_circle.png").convert("RGB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = qwen_tiny.save_folder(components, Path(tmp) / "qwen_tiny")
        for vae_side, cond_side, target_side in settings.diffusers_cases:
            ours = EditPipeline.from_pretrained(folder, dtype="fp32", device="cpu", condition_size=cond_side**2)

            def run_ours(ours: EditPipeline = ours, target_side: int = target_side, vae_side: int = vae_side) -> Any:
                return ours(
                    DIFFUSERS_PROMPT,
                    [ref],
                    Size(target_side, target_side),
                    steps=DIFFUSERS_STEPS,
                    guidance=DIFFUSERS_GUIDANCE,
                    negative=DIFFUSERS_NEGATIVE,
                    seed=0,
                    budget=vae_side,
                    mode="per_image",
                    progress=False,
                )[0]

            def run_theirs(target_side: int = target_side) -> Any:
                return theirs(
                    image=[ref],
                    prompt=DIFFUSERS_PROMPT,
                    negative_prompt=DIFFUSERS_NEGATIVE,
                    true_cfg_scale=DIFFUSERS_GUIDANCE,
                    num_inference_steps=DIFFUSERS_STEPS,
                    height=target_side,
                    width=target_side,
                    generator=torch.Generator().manual_seed(0),
                ).images[0]

            arms = {"ours": run_ours, "diffusers": run_theirs}
            times: dict[str, list[float]] = {name: [] for name in arms}
            images: dict[str, Image.Image] = {}
            with diffusers_sizes(vae_side, cond_side):
                for name in arms:  # warm-up
                    arms[name]()
                for r in range(settings.diffusers_repeats):
                    for name in alternate(list(arms), r):
                        seconds, images[name] = timed(arms[name])
                        times[name].append(seconds)
                        print(f"vs diffusers {target_side}² {name}: {seconds:.3f}s", flush=True)
            diff = np.abs(np.asarray(images["ours"], np.int16) - np.asarray(images["diffusers"], np.int16)).max()
            rows.append(
                {
                    "case": (vae_side, cond_side, target_side),
                    "ours": times["ours"],
                    "diffusers": times["diffusers"],
                    "max_pixel_diff": int(diff),
                }
            )
    return rows


def diffusers_section(settings: Settings, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The table and a one-line verdict: holds, within the noise, or does not hold."""
    table_rows = []
    verdicts = []
    for row in rows:
        vae_side, cond_side, target_side = row["case"]
        pairs = [a / b for a, b in zip(row["ours"], row["diffusers"], strict=True)]
        ratio = median(pairs)
        if round(ratio, 2) <= GOAL_VS_DIFFUSERS:
            verdicts.append(f"holds at {target_side}² ({ratio:.2f}×)")
        elif min(pairs) <= GOAL_VS_DIFFUSERS <= max(pairs):
            verdicts.append(
                f"within the noise at {target_side}² ({ratio:.2f}×, pairs {min(pairs):.2f}–{max(pairs):.2f})"
            )
        else:
            verdicts.append(f"**does not hold** at {target_side}² ({ratio:.2f}×, every pair above 1)")
        table_rows.append(
            [
                f"{vae_side}² / {cond_side}² / {target_side}²",
                f"{median(row['ours']):.3f}",
                f"{median(row['diffusers']):.3f}",
                f"**{ratio:.2f}×**",
                f"{min(pairs):.2f}–{max(pairs):.2f}",
                row["max_pixel_diff"],
            ]
        )
    table = markdown_table(
        [
            "ref VAE / ref VL / target",
            "ours (s)",
            "diffusers (s)",
            "ours / diffusers",
            "paired ratios, min–max",
            "max pixel diff (0–255)",
        ],
        table_rows,
    )
    return table, "; ".join(verdicts)


# --- 3. tiny flavour: cold process and warm call ----------------------------------------------


def uniref_command() -> list[str]:
    """The ``uniref`` console script of this interpreter's environment (not a pyenv shim)."""
    script = Path(sys.executable).parent / "uniref"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "uniref"]


def example_paths(k: int) -> list[Path]:
    return [EXAMPLES / EXAMPLE_FILES[i % len(EXAMPLE_FILES)] for i in range(k)]


def bench_tiny(settings: Settings, threads: int | None) -> dict[str, Any]:
    cold: dict[str, list[dict[str, float]]] = {str(k): [] for k in settings.tiny_ks}
    warm: dict[str, list[float]] = {str(k): [] for k in settings.tiny_ks}
    pipe = EditPipeline.from_pretrained("tiny-random")
    refs = {k: [Image.open(p).convert("RGB") for p in example_paths(k)] for k in settings.tiny_ks}
    plans: dict[str, Any] = {}

    def warm_call(k: int) -> Any:
        return pipe.generate(TINY_PROMPTS[k], refs[k], seed=0, progress=False)

    for k in settings.tiny_ks:  # warm-up
        warm_call(k)
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(settings.tiny_repeats):
            for i, k in enumerate(settings.tiny_ks):
                for arm in alternate(["cold", "warm"], r + i):
                    if arm == "warm":
                        seconds, _ = timed(lambda k=k: warm_call(k))
                        warm[str(k)].append(seconds)
                        continue
                    cmd = [*uniref_command(), "edit", TINY_PROMPTS[k]]
                    for path in example_paths(k):
                        cmd += ["--ref", str(path.relative_to(ROOT))]
                    cmd += ["-o", str(Path(tmp) / f"k{k}.png"), "--model", "tiny-random", "--json", "--no-progress"]
                    seconds, proc = timed(
                        lambda cmd=cmd: subprocess.run(
                            cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True
                        )
                    )
                    report = json.loads(proc.stdout.strip().splitlines()[-1])
                    cold[str(k)].append({"process": seconds, **report["seconds"]})
                    plans[str(k)] = (report["width"], report["height"], report["plan"]["total_tokens"])
                    print(f"tiny K={k} cold: {seconds:.2f}s", flush=True)
    return {"cold": cold, "warm": warm, "plans": plans, "steps": pipe.model.default_steps}


def tiny_section(res: dict[str, Any]) -> str:
    rows = []
    for k, runs in res["cold"].items():
        width, height, tokens = res["plans"][k]
        process = [x["process"] for x in runs]
        inside = [x["total"] for x in runs]
        rows.append(
            [
                k,
                f"{tokens} → {width}x{height}",
                f"**{median(process):.2f}**",
                f"{median(inside):.2f}",
                f"{median([x['load'] for x in runs]):.2f}",
                f"{median([a - b for a, b in zip(process, inside, strict=True)]):.2f}",
                f"**{median(res['warm'][k]):.2f}**",
            ]
        )
    return markdown_table(
        [
            "K",
            "ref tokens → output",
            "cold process (s)",
            "in-process total (s)",
            "of which load (s)",
            "start-up + imports + exit (s)",
            "warm `pipe.generate` (s)",
        ],
        rows,
    )


# --- threads ----------------------------------------------------------------------------------


def probe_threads(qwen_tiny: ModuleType, threads: int, repeats: int = 5) -> dict[int, float]:
    """Seconds per forward of the tiny test transformer with one torch thread per core vs ``threads``:
    on busy cores, extra threads make every small op wait for a descheduled thread."""
    transformer = qwen_tiny.build_components(seed=0)["transformer"]
    hidden, txt = torch.randn(1, 32, 16), torch.randn(1, 30, 16)
    shapes = [[(1, 4, 4), (1, 4, 4)]]
    saved = torch.get_num_threads()
    out = {}
    for n in dict.fromkeys([os.cpu_count() or 1, threads]):
        torch.set_num_threads(n)
        with torch.no_grad():

            def call() -> Any:
                return transformer(
                    hidden_states=hidden,
                    timestep=torch.tensor([0.5]),
                    encoder_hidden_states=txt,
                    img_shapes=shapes,
                    return_dict=False,
                )

            call()
            out[n] = median([timed(call)[0] for _ in range(repeats)])
    torch.set_num_threads(saved)
    return out


# --- report -----------------------------------------------------------------------------------


def measure(settings: Settings, threads: int | None) -> dict[str, Any]:
    """Run every benchmark; the result is plain data (JSON), rendered by :func:`render`."""
    qwen_tiny = load_qwen_tiny()
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    per_thread = None
    if threads is not None:
        per_thread = {str(n): s for n, s in probe_threads(qwen_tiny, threads).items()}
        torch.set_num_threads(threads)
    mid = bench_mid(settings, qwen_tiny)
    vs = bench_diffusers(settings, qwen_tiny)
    tiny = bench_tiny(settings, threads)
    return {
        "settings": asdict(settings),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "thread_probe": per_thread,
        "minutes": (time.perf_counter() - start) / 60,
        "load": [load_start, os.getloadavg()[0]],
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
        "mid": mid,
        "diffusers": vs,
        "tiny": tiny,
    }


def settings_from(data: dict[str, Any]) -> Settings:
    def tuples(x: Any) -> Any:
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return Settings(**{name: tuples(value) for name, value in data.items()})


def render(results: dict[str, Any]) -> str:
    """The markdown section from :func:`measure`'s results."""
    quick = results["quick"]
    settings = settings_from(results["settings"])
    mid = results["mid"]
    mid_tables, s = mid_section(settings, mid)
    vs_table, vs_verdict = diffusers_section(settings, results["diffusers"])
    tiny = results["tiny"]
    tiny_table = tiny_section(tiny)
    machine = results["machine"]
    load_start, load_end = results["load"]
    threads = results["threads"]
    rerun = "python -m benchmarks.bench_model" + (" --quick" if quick else "")
    rerun += f" --threads {threads}" if threads is not None else ""
    threads_note = ""
    probe = results["thread_probe"]
    if probe and len(probe) > 1:
        default, chosen = (f"{n} thread(s) {sec * 1000:.1f} ms" for n, sec in probe.items())
        threads_note = (
            f"Run with `--threads {threads}`: with the cores busy, one torch thread per core makes every "
            f"small op wait for a descheduled thread (the 2-layer test transformer's forward here: {default} "
            f"vs {chosen}), which would time the scheduler rather than the code.\n"
        )
    shared = (
        "**The machine was shared**: other processes were using the cores"
        if load_start >= 0.5 * machine["cores"]
        else "The machine was mostly idle"
    )
    vae_note = ""
    if mid["vae"] is not None:
        vae_note = (
            f"\nVAE note: diffusers' `AutoencoderKLQwenImage` with only 4 base channels (z_dim 16, 8×) takes "
            f"{mid['vae']['encode']:.1f} s to encode and {mid['vae']['decode']:.1f} s to decode one 1024² image "
            "here (its causal 3-D convolutions run PyTorch's slow CPU conv3d path), more than a transformer call, "
            "so the end-to-end runs above use the patch codec. With a real VAE, `per_image` encodes K such "
            "images and SELF the pixels of one.\n"
        )
    mid_goals = mid_goals_text(settings, s)
    n_ends = settings.forward_repeats + settings.growth_repeats
    width = MID_WIDTH
    text = f"""## Model path: SELF vs per-image, ours vs diffusers, tiny `uniref edit` (`benchmarks/bench_model.py`)

Rerun: `{rerun}` ({results["minutes"]:.1f} min{"; quick run" if quick else ""}). CPU: {machine["cpu"]},
{machine["cores"]} cores, torch {machine["torch"]} with {results["torch_threads"]} thread(s), fp32.
{shared} (load average {load_start:.1f} at the start, {load_end:.1f} at the end), so absolute seconds are
inflated and noisy; the arms of every comparison ran interleaved (A, B, B, A, …) in one process and
ratios are medians of the paired ratios.
{threads_note}
### 1. SELF (`global`) vs `per_image` on a mid-size random Qwen-Image transformer, 1024² budget

`QwenImageTransformer2DModel({", ".join(f"{k}={v}" for k, v in MID_TRANSFORMER.items())})`: the real latent
geometry (16 channels, 8× VAE, 2×2 patches: 4,096 tokens per 1024²), the real head dim 128 and RoPE axes
(16, 56, 56); 2 layers of 2 heads (width {width}) instead of 60 of 24 (3072). Text side: the tiny
Qwen2.5-VL of `tests/qwen_tiny.py` (width 16), which sees every reference at ≈384² as diffusers does
(≈196 vision tokens each, so text grows with K in both modes). References: K first of
{", ".join(str(x) for x in REF_SIZES)} (4:3, 16:9, 9:16, 1:1, 3:2, 2:3); target 1024×1024.
`global`: all K references jointly under 1024²; `per_image`: each its own 1024² (diffusers).
Forward = one denoiser call (`model.velocity`, batch 1), median of {settings.forward_repeats}
({n_ends} for global K={settings.ks[0]} and K={settings.ks[-1]}, which also ran in the growth pairs). The
FLOP columns count projections (24·d² per token and layer) and attention (4·d·L) for the same token
counts, in this model and at Qwen-Image's real 60 layers × 3072 width, where projections weigh more than
in this narrow model. Rerun: `{rerun}`.

{mid_tables}

{mid_goals}

Caveat on text tokens: `tests/qwen_tiny.py`'s tokenizer is byte-level (no merges), so the instruction and
Qwen's system template come out as about 300 more tokens than Qwen's BPE would give; the vision tokens are
exact (same image processor). More text makes K=1 and K=6 closer in both modes.
{vae_note}
### 2. Our pipeline vs diffusers' `QwenImageEditPlusPipeline`

Same tiny random weights (`tests/qwen_tiny.py`: 2-layer transformer, 4-channel VAE, tiny Qwen2.5-VL),
K = 1 (`examples/red_circle.png`), `per_image`, {DIFFUSERS_STEPS} steps, true CFG {DIFFUSERS_GUIDANCE}, seed 0,
PIL output; diffusers' `VAE_IMAGE_SIZE` / `CONDITION_IMAGE_SIZE` shrunk to the first column's sides and ours
given the same budgets. Median of {settings.diffusers_repeats} interleaved calls each after a warm-up. Rerun: `{rerun}`.
Goal: ours ≤ {GOAL_VS_DIFFUSERS}× diffusers' time — {vs_verdict}.

{vs_table}

### 3. The tiny flavour (`tiny-random`): cold `uniref edit` and a warm call

`uniref edit "…" --ref … -o out.png --model tiny-random --json --no-progress`, start to exit as a
subprocess, vs `EditPipeline.from_pretrained("tiny-random").generate(...)` already loaded; the model's
default {tiny["steps"]} steps, no CFG, native 64² budget; references `examples/` background, red_circle,
blue_square, repeated for K = 6. Median of {settings.tiny_repeats}. "In-process total" is the CLI's own
`--json` `seconds.total`; the rest of the process time is Python start-up, imports and exit. Rerun: `{rerun}`.

{tiny_table}
"""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer K and repeats; print, do not write the doc")
    parser.add_argument("--threads", type=int, help="torch threads here and in the `uniref edit` subprocesses")
    parser.add_argument("--save", type=Path, help="also write the raw results (JSON) here")
    parser.add_argument("--load", type=Path, help="render saved raw results instead of measuring")
    args = parser.parse_args()
    if args.load is not None:
        results = json.loads(args.load.read_text())
    else:
        results = {"quick": args.quick, **measure(QUICK if args.quick else FULL, args.threads)}
        if args.save is not None:
            args.save.write_text(json.dumps(results, indent=1))
    text = render(results)
    print(text)
    if not results["quick"]:
        write_section("bench_model", text)


if __name__ == "__main__":
    main()
