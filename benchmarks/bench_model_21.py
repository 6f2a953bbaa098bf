"""Qwen-Image-2.1 (``QwenImage21Transformer2DModel``) mid-size: K = 1, 3, 6, 10 at 1024², SELF vs
per-image, with the condition cache on and off. ``python -m benchmarks.bench_model_21 [--smoke]
[--threads 1]`` writes its own section of docs/benchmarks.md (``--smoke``: the same code shrunk,
prints only). The Qwen-Image-Edit half lives in ``benchmarks.bench_model_mid``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from PIL import Image

from benchmarks._report import markdown_table
from benchmarks._timing import alternate, key, median, paired_ratio, random_image, timed
from benchmarks.bench_model_mid import BUDGET_SIDE, FORWARD_SIGMA, MID_PROMPT, REF_SIZES, PatchCodec, forward_inputs
from uniref.budget import PlanMode, Size
from uniref.pipeline import EditPipeline

# --- 2. Qwen-Image-2.1: SELF vs per-image, condition cache on vs off -----------------------------
# Run on its own (it writes its own section of docs/benchmarks.md):
#
#     python -m benchmarks.bench_model_21 --threads 1   # the K = 1, 3, 6, 10 sweep at 1024²
#     python -m benchmarks.bench_model_21 --smoke       # the same code, shrunk: seconds; prints only
#
# The real model (diffusers' QwenImage21Transformer2DModel defaults): 32 single-stream blocks of 32
# heads of 128 (width 4096), SwiGLU of ratio 3, 64 latent channels at 16x, no patching (one latent
# cell is one token), RoPE axes 16/56/56.
REAL21_LAYERS = 32
REAL21_WIDTH = 32 * 128
MLP21_RATIO = 3
# The mid-size 2.1 transformer: the real latent geometry, head dim, MLP ratio and RoPE axes; two
# blocks of two heads. Its text width is the tiny Qwen3-VL's (tests/qwen21_tiny.py, 16).
MID21_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "context_in_dim": 16,
    "mlp_ratio": MLP21_RATIO,
    "axes_dims_rope": (16, 56, 56),
}
LATENT21_CHANNELS = 64
VAE21_SCALE = 16
# Up to the model's 10 references: the six above, then 4:3 and 3:4 again, 2:1 and 3:4 at other sizes.
REF21_SIZES = [*REF_SIZES, Size(1280, 960), Size(960, 1280), Size(2048, 1024), Size(1200, 1600)]
SECTION21 = "bench_model_21"


@dataclass(frozen=True)
class Settings21:
    ks: tuple[int, ...] = (1, 3, 6, 10)
    side: int = BUDGET_SIDE  # the references' budget side (SELF: all of them; per_image: each) and the target's
    forward_repeats: int = 2  # interleaved rounds of the forward arms
    e2e_steps: int = 2
    e2e_repeats: int = 1
    transformer: tuple[tuple[str, Any], ...] = tuple(MID21_TRANSFORMER.items())


# One block of two 16-wide heads (RoPE axes sum to the head dim), K = 1 and 3 at 96²: seconds.
SMOKE21 = Settings21(
    ks=(1, 3),
    side=96,
    forward_repeats=1,
    e2e_steps=2,
    transformer=tuple(
        {**MID21_TRANSFORMER, "num_layers": 1, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}.items()
    ),
)


def _qwen21_tiny() -> ModuleType:
    """tests/qwen21_tiny.py (it imports tests/qwen_tiny.py, so tests/ goes on the path)."""
    import importlib
    import sys

    from benchmarks._timing import ROOT

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("qwen21_tiny")


def build_mid21_model(settings: Settings21) -> Any:
    """The mid-size 2.1 transformer, the tiny Qwen3-VL encoder / tokenizer / processor and a 16x patch
    codec, behind our Qwen-Image-2.1 adapter."""
    from diffusers import QwenImage21Transformer2DModel

    from uniref.models.qwen_image21 import QwenImage21

    tiny = _qwen21_tiny()
    parts = tiny.build_components(seed=0)
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(**dict(settings.transformer)).eval()
    return QwenImage21(
        transformer=transformer,
        vae=PatchCodec(LATENT21_CHANNELS, VAE21_SCALE).eval(),
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        image_processor=parts["image_processor"],
        chat_template=tiny.CHAT_TEMPLATE,
        execution_device=torch.device("cpu"),
    )


def transformer21_flops(segments: list[int], target: int, layers: int, width: int, cached: bool) -> float:
    """FLOPs of one 2.1 transformer call over the condition ``segments`` (token counts in sequence
    order: text pieces and references) and ``target`` tokens. Per layer, 2·(4 + 3·r)·d² per computed
    token (QKV, out and SwiGLU's three matrices) and 4·d per (query, key) pair. A full call computes
    every token, a segment's queries seeing every key up to its end (text's causal triangles counted
    whole) and the target's seeing all; a cached call computes the target's tokens only."""
    total = sum(segments) + target
    pairs = target * total
    computed = target
    if not cached:
        ends = torch.tensor(segments).cumsum(0).tolist() if segments else []
        pairs += sum(n * end for n, end in zip(segments, ends, strict=True))
        computed = total
    return layers * (2 * (4 + 3 * MLP21_RATIO) * width**2 * computed + 4 * width * pairs)


def condition_segments(flags: torch.Tensor) -> list[int]:
    """Token counts of the condition sequence's segments from the conditioning's slot column: a run
    of text tokens stays text, a run of n reference slots becomes that reference's 4n latent tokens."""
    runs: list[list[float]] = []
    for flag in flags.tolist():
        if runs and runs[-1][0] == flag:
            runs[-1][1] += 1
        else:
            runs.append([flag, 1])
    return [int(n * 4 if flag else n) for flag, n in runs]


@dataclass
class Case21:
    img_tokens: int  # target + references
    txt_tokens: int  # text tokens other than the reference slots
    segments: list[int]
    target_tokens: int
    run_full: Callable[[], float]  # one uncached call (every step with the cache off): seconds
    run_cached: Callable[[], float]  # one step after the cache is filled (cache on): seconds


def prepare_forward21(pipe: EditPipeline, refs: list[Image.Image], mode: PlanMode, side: int) -> Case21:
    """Inputs built once; timed: an uncached ``velocity`` call, and one after the request's condition
    cache was filled."""
    from uniref.pipeline import condition_cache

    model = pipe.model
    seq, batch, cond = forward_inputs(pipe, refs, mode, side)
    sigmas = torch.tensor([FORWARD_SIGMA]), torch.tensor([FORWARD_SIGMA / 2])

    @torch.no_grad()
    def run_full() -> float:
        return timed(lambda: model.velocity(batch, cond, sigmas[0]))[0]

    @torch.no_grad()
    def run_cached() -> float:
        with condition_cache(model):
            model.velocity(batch, cond, sigmas[0])  # the first step fills the cache
            return timed(lambda: model.velocity(batch, cond, sigmas[1]))[0]

    flags = cond.txt[0][:, -1]
    txt = int((flags == 0).sum())
    return Case21(seq.tokens.shape[0], txt, condition_segments(flags), seq.num_target_tokens, run_full, run_cached)


def bench_mid21(settings: Settings21) -> dict[str, Any]:
    """Forward arms (uncached / cached step, global / per_image) interleaved per K, then end to end
    (mode x cache) interleaved per K."""
    torch.manual_seed(0)
    pipe = EditPipeline(build_mid21_model(settings))
    model = pipe.model
    refs = [random_image(s, i) for i, s in enumerate(REF21_SIZES)]
    modes = [PlanMode.GLOBAL.value, PlanMode.PER_IMAGE.value]
    cases = {
        key(k, m): prepare_forward21(pipe, refs[:k], PlanMode(m), settings.side) for k in settings.ks for m in modes
    }
    cases[key(settings.ks[0], modes[0])].run_full()  # warm-up (allocator, kernels)
    arms = [f"{m} {c}" for m in modes for c in ("full", "cached")]
    forward: dict[str, list[float]] = {f"{k} {a}": [] for k in settings.ks for a in arms}
    for r in range(settings.forward_repeats):
        for i, k in enumerate(settings.ks):
            for arm in alternate(arms, r + i):
                m, kind = arm.split()
                case = cases[key(k, m)]
                seconds = case.run_cached() if kind == "cached" else case.run_full()
                forward[f"{k} {arm}"].append(seconds)
                print(f"forward K={k} {arm}: {seconds:.2f}s", flush=True)
    e2e_arms = [f"{m} {c}" for m in modes for c in ("off", "on")]
    e2e: dict[str, list[dict[str, float]]] = {f"{k} {a}": [] for k in settings.ks for a in e2e_arms}
    for r in range(settings.e2e_repeats):
        for i, k in enumerate(settings.ks):
            for arm in alternate(e2e_arms, r + i + 1):
                m, cache = arm.split()
                model.kv_cache = cache == "on"
                seconds, result = timed(
                    lambda k=k, m=m: pipe.generate(
                        MID_PROMPT,
                        refs[:k],
                        Size(settings.side, settings.side),
                        steps=settings.e2e_steps,
                        guidance=1.0,
                        seed=0,
                        budget=settings.side,
                        mode=m,
                        progress=False,
                    )
                )
                parts = result.timings.as_dict()
                e2e[f"{k} {arm}"].append({"wall": seconds, **{p: parts[p] for p in ("encode", "denoise", "decode")}})
                print(f"e2e K={k} {arm}: {seconds:.2f}s", flush=True)
    model.kv_cache = True
    return {
        "cases": {
            name: {"img": c.img_tokens, "txt": c.txt_tokens, "segments": c.segments, "target": c.target_tokens}
            for name, c in cases.items()
        },
        "forward": forward,
        "e2e": e2e,
        "default_steps": model.default_steps,
    }


def mid21_section(settings: Settings21, res: dict[str, Any]) -> str:
    cases, forward, steps = res["cases"], res["forward"], res["default_steps"]
    g, p = PlanMode.GLOBAL.value, PlanMode.PER_IMAGE.value
    real = (REAL21_LAYERS, REAL21_WIDTH)

    def fwd(k: int, arm: str) -> float:
        return median(forward[f"{k} {arm}"])

    def flops(k: int, m: str, cached: bool) -> float:
        c = cases[key(k, m)]
        return transformer21_flops(c["segments"], c["target"], *real, cached=cached)

    def projected(k: int, m: str, cache: bool) -> float:
        """Default sampling from the measured parts: encode + steps x step + decode, where with the
        cache the first step is a full call and the others are cached ones."""
        runs = res["e2e"][f"{k} {m} {'on' if cache else 'off'}"]
        ends = median([x["encode"] for x in runs]) + median([x["decode"] for x in runs])
        full, cached = fwd(k, f"{m} full"), fwd(k, f"{m} cached")
        return ends + (full + (steps - 1) * cached if cache else steps * full)

    def both(fn: Any, fmt: str, a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
        return f"{fn(*a):{fmt}} / {fn(*b):{fmt}}"

    def ratio(k: int, kind: str) -> float:
        return paired_ratio(forward[f"{k} {p} {kind}"], forward[f"{k} {g} {kind}"])

    def wall(k: int, arm: str) -> float:
        return median([x["wall"] for x in res["e2e"][f"{k} {arm}"]])

    fwd_rows, e2e_rows = [], []
    for k in settings.ks:
        cg, cp = cases[key(k, g)], cases[key(k, p)]
        fwd_rows.append(
            [k, f"{cg['img']} + {cg['txt']}", f"{cp['img']} + {cp['txt']}"]
            + [both(fwd, ".2f", (k, f"{m} full"), (k, f"{m} cached")) for m in (g, p)]
            + [f"**{both(ratio, '.2f', (k, 'full'), (k, 'cached'))}**"]
            + [f"{flops(k, p, c) / flops(k, g, c):.2f}" for c in (False, True)]
            + [f"{flops(k, m, False) / flops(k, m, True):.1f}" for m in (g, p)]
        )
        e2e_rows.append(
            [k]
            + [both(wall, ".2f", (k, f"{m} off"), (k, f"{m} on")) for m in (g, p)]
            + [both(projected, ".0f", (k, m, False), (k, m, True)) for m in (g, p)]
            + [f"**{projected(k, p, False) / projected(k, g, True):.2f}×**"]
        )
    fwd_header = ["K", "global tokens (img + txt)", "per_image tokens (img + txt)"]
    fwd_header += [f"{m}: uncached / cached step (s)" for m in (g, p)]
    fwd_header += ["per_image / global: uncached / cached", "real-dims FLOPs per_image / global, uncached"]
    fwd_header += ["same, cached step", "real-dims FLOPs uncached / cached, global", "same, per_image"]
    e2e_header = ["K"] + [f"{m}: cache off / on (s)" for m in (g, p)]
    e2e_header += [f"projected {steps} steps, {m}: off / on (s)" for m in (g, p)]
    e2e_header += ["projected per_image without cache (diffusers' way) / SELF with cache"]
    cfg = dict(settings.transformer)
    return f"""## Qwen-Image-2.1: SELF vs per-image, condition cache on vs off (`benchmarks/bench_model_21.py`)

A random `QwenImage21Transformer2DModel` with the real latent geometry (64 channels at 16x, one token
per latent cell), head dim, SwiGLU ratio and RoPE axes, at {cfg["num_layers"]} blocks of
{cfg["num_attention_heads"]} heads; the tiny random Qwen3-VL encoder of the tests and a linear 16x patch
codec in place of the VAE; CPU fp32. K references of mixed real aspect ratios (1024–2048 px originals),
a {settings.side}² target; `global` = SELF (all references jointly under {settings.side}²), `per_image` =
diffusers' `QwenImage21Pipeline` (each at `output_resolution`² = {settings.side}²). Text tokens exclude
the reference slots (the transformer writes the reference latents into them). "Uncached" is a full
transformer call (every step with the cache off, the first with it on); a "cached step" computes the
target's tokens only. Medians of {settings.forward_repeats} interleaved round(s), ratios medians of paired
ratios; FLOPs at the real dims (32 blocks, width 4096) from `transformer21_flops`.

{markdown_table(fwd_header, fwd_rows)}

End to end: `pipe.generate` at {settings.e2e_steps} step(s), guidance 1.0 (the model card's), decode
included, {settings.e2e_repeats} run(s) per arm. Projected: the measured encode and decode plus, for the
default {steps} steps, {steps} uncached calls (cache off) or one uncached and {steps - 1} cached (on).

{markdown_table(e2e_header, e2e_rows)}"""


def main21(argv: list[str] | None = None) -> str:
    import argparse

    from benchmarks._report import write_section

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="shrunken model and K: seconds; prints, writes nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on busy cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SMOKE21 if args.smoke else Settings21()
    text = mid21_section(settings, bench_mid21(settings))
    print(text)
    if not args.smoke:
        write_section(SECTION21, text)
    return text


if __name__ == "__main__":
    main21()
