"""One unattended check of the real-size models on a single large GPU (H100/H200 class).

    python -m benchmarks.device_check [--smoke] [--out DIR]

Writes ``DIR/device_check.json`` and ``DIR/device_check.md`` (default DIR: ``device_check/``):

1. **Sampling latency**: full-size random-weight Qwen-Image-Edit-2511 and Qwen-Image-2.1
   transformers in bf16 (built with empty weights, materialised directly on the GPU), K = 1, 3, 6
   references of 1024² originals, SELF (``global``) vs ``per_image``, and for 2.1 the condition
   key/value cache on vs off. What is timed is our sampler (``EditPipeline._denoise``: packing, the
   adapter's velocity, the cache, Euler steps) over ``steps`` steps without CFG; the text encoder and
   the VAE are not built (random conditioning of the real width and length stands in for them).
2. **LoRA SFT step**: K = 3 references at each budget stage 1024², 1536², 2048² (SELF, target at the
   stage budget), LoRA rank 64 on the attention projections, gradient checkpointing, AdamW. Reported:
   tokens/s (image + text tokens through the transformer), peak memory, and MFU.

MFU = FLOPs of one step / (step seconds · peak bf16 dense FLOP/s of the device). The FLOPs are counted
by ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (forward, the checkpointed
recomputation, backward): matmuls and scaled-dot-product attention, elementwise work not counted. The
peak is NVIDIA's datasheet dense BF16 figure for the recognised device names (``PEAK_BF16``); on any
other device MFU is left empty.

Every section runs under a time guard (``Guard``): a measurement that would start after its
section's budget is recorded as skipped with the reason, and so is one that runs out of memory; the
whole run is kept under ``TOTAL_SECONDS``. ``--smoke`` runs the same code on CPU with shrunken
transformers and budgets (seconds), so CI keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from benchmarks._report import markdown_table
from benchmarks._timing import ROOT
from uniref import flow
from uniref.budget import PlanMode, Size, plan, plan_target
from uniref.models.base import Conditioning, EditModel
from uniref.pipeline import EditPipeline, with_targets
from uniref.sequence import SelfSequence, build_sequence, pack_sequences

# Whole run under 8 minutes on the GPU: 7 for the sections, the rest for building models.
TOTAL_SECONDS = 7 * 60
# NVIDIA datasheet dense BF16 tensor-core throughput (FLOP/s), by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
# Qwen-Image-Edit-2511 (Qwen/Qwen-Image-Edit-2511 transformer/config.json: diffusers' defaults + zero_cond_t).
EDIT_2511 = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 3584}
# Qwen-Image-2.1 (diffusers' QwenImage21Transformer2DModel defaults: 32 blocks, 32 heads of 128).
IMAGE_21 = {"num_layers": 32, "num_attention_heads": 32, "attention_head_dim": 128, "context_in_dim": 4096}
# Text stand-ins: prompt tokens, and Qwen-Image-Edit's VL tokens per reference (384² at 28 px).
PROMPT_TOKENS = 128
EDIT_VL_TOKENS_PER_REF = (384 // 28) ** 2
LORA_RANK = 64
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# --smoke: one block of two 16-wide heads (RoPE axes must sum to the head dim).
_SMOKE_BLOCKS = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)}


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``smoke()`` is the same run shrunk for CPU."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    ks: tuple[int, ...] = (1, 3, 6)
    budget_side: int = 1024  # references' budget and the target side in the sampling section
    steps: int = 8
    stages: tuple[int, ...] = (1024, 1536, 2048)
    sft_k: int = 3
    edit_config: dict[str, Any] = field(default_factory=lambda: dict(EDIT_2511))
    image21_config: dict[str, Any] = field(default_factory=lambda: dict(IMAGE_21))
    prompt_tokens: int = PROMPT_TOKENS
    edit_vl_tokens: int = EDIT_VL_TOKENS_PER_REF
    lora_rank: int = LORA_RANK
    # Section budgets per model: 2 x (120 + 90) s fills TOTAL_SECONDS.
    sampling_seconds: float = 120.0
    sft_seconds: float = 90.0
    total_seconds: float = TOTAL_SECONDS

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            device="cpu",
            dtype=torch.float32,
            ks=(1, 3),
            budget_side=64,
            steps=2,
            stages=(64, 96),
            edit_config={**_SMOKE_BLOCKS, "joint_attention_dim": 16},
            image21_config={**_SMOKE_BLOCKS, "context_in_dim": 16},
            prompt_tokens=8,
            edit_vl_tokens=4,
            lora_rank=4,
            sampling_seconds=60.0,
            sft_seconds=60.0,
        )


class Guard:
    """Time guard for one section: ``run`` measures unless the section or the whole run is out of
    time, and records a skip (with its reason) instead of raising on out-of-memory."""

    def __init__(self, name: str, seconds: float, deadline: float) -> None:
        self.name, self.end, self.deadline = name, time.monotonic() + seconds, deadline
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    def run(self, label: str, fn: Callable[[], dict[str, Any]]) -> None:
        now = time.monotonic()
        if now > self.end or now > self.deadline:
            self.skipped.append({"case": label, "reason": "time guard: section budget used up"})
            return
        try:
            self.rows.append({"case": label, **fn()})
        except torch.OutOfMemoryError as exc:
            self.skipped.append({"case": label, "reason": f"out of memory: {str(exc).splitlines()[0]}"})
        finally:
            _free()

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "skipped": self.skipped}


# --- models with random weights ---------------------------------------------------------------


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Give every (empty) parameter real random storage on ``device`` and move buffers there. Weights
    are N(0, 0.02) (vectors: ones), which is all a timing run needs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            data = torch.empty(p.shape, device=device, dtype=dtype)
            if data.dim() >= 2:
                data.normal_(0.0, 0.02, generator=gen)
            else:
                data.fill_(1.0)
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None:
                sub._buffers[name] = b.to(device)


def random_transformer(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """``cls(**config)`` with no CPU copy of the weights: parameters start empty (accelerate's
    ``init_empty_weights``), plain tensors such as RoPE tables are built normally, then materialise."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    materialise(model, device, dtype)
    return model.eval()


def _stand_in_vae(z_dim: int, downsample: int) -> Any:
    """What the adapters read from a VAE config; the benchmark never encodes or decodes."""
    return SimpleNamespace(
        config=SimpleNamespace(
            z_dim=z_dim,
            temperal_downsample=[False] * downsample,
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
            in_channels=4,
        )
    )


def _tests_module(name: str) -> ModuleType:
    """tests/<name>.py (offline tokenizers with Qwen's special tokens), with tests/ importable."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import importlib

    return importlib.import_module(name)


def build_edit_2511(s: Settings) -> EditModel:
    from diffusers import QwenImageTransformer2DModel

    from uniref.models.qwen_image import QwenImageEdit

    tiny = _tests_module("qwen_tiny")
    config = {**s.edit_config, "zero_cond_t": True}
    transformer = random_transformer(QwenImageTransformer2DModel, config, torch.device(s.device), s.dtype)
    return QwenImageEdit(
        transformer=transformer,
        vae=_stand_in_vae(16, 3),  # Qwen-Image VAE: 16 channels, 8x (three downsamplings)
        text_encoder=None,
        tokenizer=tiny.byte_level_tokenizer(),
        image_processor=tiny.tiny_image_processor(),
        execution_device=torch.device(s.device),
    )


def build_image_21(s: Settings) -> EditModel:
    from diffusers import QwenImage21Transformer2DModel

    from uniref.models.qwen_image21 import QwenImage21

    tiny = _tests_module("qwen21_tiny")
    tokenizer = tiny.byte_level_tokenizer()
    transformer = random_transformer(QwenImage21Transformer2DModel, s.image21_config, torch.device(s.device), s.dtype)
    return QwenImage21(
        transformer=transformer,
        vae=_stand_in_vae(64, 4),  # 2.1 VAE: 64 channels, 16x
        text_encoder=None,
        tokenizer=tokenizer,
        image_processor=tiny.tiny_image_processor(),
        chat_template=tiny.CHAT_TEMPLATE,
        execution_device=torch.device(s.device),
    )


# --- inputs: planned sizes, random latents, random conditioning --------------------------------


def _ref_originals(k: int, side: int) -> list[Size]:
    return [Size(side, side)] * k  # 1024² originals: per_image keeps each at the budget


def make_requests(model: EditModel, s: Settings, k: int, mode: str, side: int, seed: int = 0) -> tuple[Any, ...]:
    """One request's SELF sequence and conditioning, with random latents and text of the real width."""
    spec = model.spec
    gen = torch.Generator().manual_seed(seed)
    ref_plan = plan(_ref_originals(k, side), side * side, spec.plan_multiple, PlanMode(mode))
    target = plan_target(side * side, spec.plan_multiple, size=Size(side, side), mode=mode)

    def latent(size: Size) -> torch.Tensor:
        shape = (spec.latent_channels, size.height // spec.vae_scale, size.width // spec.vae_scale)
        return torch.randn(shape, generator=gen).to(s.device, s.dtype)

    seq = build_sequence(latent(target), [latent(r) for r in ref_plan.sizes], spec.patch_size, spec.centred_positions)
    return seq, _conditioning(model, s, seq, gen), ref_plan


def _conditioning(model: EditModel, s: Settings, seq: SelfSequence, gen: torch.Generator) -> Conditioning:
    """Random text states laid out as the adapter's encoder would give them."""
    name = type(model).__name__
    if name == "QwenImage21":
        width = s.image21_config["context_in_dim"]
        # [prompt-template tokens | slots of ref 1 | label | ... | slots of ref K | prompt]: one slot per 2x2 tokens.
        parts, flags = [], []
        for h, w in seq.grids[1:]:
            parts += [4, h * w // 4]
            flags += [0.0, 1.0]
        parts.append(s.prompt_tokens)
        flags.append(0.0)
        columns = [torch.full((n, 1), f) for n, f in zip(parts, flags, strict=True)]
        flag = torch.cat(columns)
        states = torch.randn(flag.shape[0], width, generator=gen)
        return Conditioning([torch.cat([states, flag], dim=1).to(s.device, s.dtype)])
    width = s.edit_config["joint_attention_dim"]
    length = s.prompt_tokens + s.edit_vl_tokens * seq.num_refs
    return Conditioning([torch.randn(length, width, generator=gen).to(s.device, s.dtype)])


# --- sections ---------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_case(model: EditModel, s: Settings, k: int, mode: str, cache: bool) -> dict[str, Any]:
    """Latency of ``steps`` sampler steps for one request (after one warm-up step)."""
    seq, cond, ref_plan = make_requests(model, s, k, mode, s.budget_side)
    if hasattr(model, "kv_cache"):
        model.kv_cache = cache
    pipe = EditPipeline(model)
    schedule = flow.sigmas(s.steps, seq.num_target_tokens, model.spec.schedule)
    pipe._denoise([seq], cond, None, [schedule[:2]], 1.0, False, None)  # warm-up (kernels, allocator)
    _sync(s.device)
    start = time.perf_counter()
    pipe._denoise([seq], cond, None, [schedule], 1.0, False, None)
    _sync(s.device)
    seconds = time.perf_counter() - start
    return {
        "k": k,
        "mode": mode,
        "cache": cache,
        "ref_tokens": sum(ref_plan.tokens(model.spec.token_pixels)),
        "target_tokens": seq.num_target_tokens,
        "text_tokens": cond.txt[0].shape[0],
        "steps": s.steps,
        "seconds": round(seconds, 4),
        "seconds_per_step": round(seconds / s.steps, 4),
    }


def sampling_section(model: EditModel, s: Settings, guard: Guard, caches: tuple[bool, ...]) -> None:
    for k in s.ks:
        for mode in ("global", "per_image"):
            for cache in caches:
                label = f"K={k} {mode}" + (f" cache={'on' if cache else 'off'}" if len(caches) > 1 else "")
                guard.run(label, lambda k=k, mode=mode, cache=cache: sample_case(model, s, k, mode, cache))


@contextlib.contextmanager
def lora(model: EditModel, rank: int) -> Iterator[list[torch.nn.Parameter]]:
    """LoRA adapters on the denoiser's attention projections for the duration of the block."""
    from peft import LoraConfig, inject_adapter_in_model

    transformer = model.denoiser()
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian")
    inject_adapter_in_model(config, transformer, adapter_name="device_check")
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.to(model.dtype)
        p.requires_grad_(True)
    try:
        yield params
    finally:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for sub in transformer.modules():
            if isinstance(sub, BaseTunerLayer):
                sub.delete_adapter("device_check")


def _sft_step(model: EditModel, batch: Any, cond: Conditioning, seq: SelfSequence, opt: Any) -> None:
    """One flow-matching step on the target tokens: x_t = (1−σ)·x_0 + σ·ε, loss ‖v̂ − (ε − x_0)‖²."""
    x_0 = seq.tokens[: seq.num_target_tokens]
    noise = torch.randn_like(x_0)
    sigma = torch.tensor([0.6])

    noisy = with_targets(batch, [flow.add_noise(x_0, noise, 0.6)])
    v_hat = noisy.target_tokens(model.velocity(noisy, cond, sigma))[0]
    loss = (v_hat.float() - flow.velocity_target(x_0, noise).float()).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_case(model: EditModel, s: Settings, side: int, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    seq, cond, ref_plan = make_requests(model, s, s.sft_k, "global", side, seed=1)
    batch = pack_sequences([seq], extra_lengths=[cond.txt[0].shape[0]])
    opt = torch.optim.AdamW(params, lr=1e-4)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    with counter:  # the first step: counts FLOPs and warms up
        _sft_step(model, batch, cond, seq, opt)
    _sync(s.device)
    start = time.perf_counter()
    _sft_step(model, batch, cond, seq, opt)
    _sync(s.device)
    seconds = time.perf_counter() - start
    tokens = seq.tokens.shape[0] + cond.txt[0].shape[0]
    flops = counter.get_total_flops()
    peak = _peak_flops(s.device)
    return {
        "stage": f"{side}²",
        "k": s.sft_k,
        "ref_tokens": sum(ref_plan.tokens(model.spec.token_pixels)),
        "target_tokens": seq.num_target_tokens,
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_second": round(tokens / seconds, 1),
        "step_gflops": round(flops / 1e9, 3),
        "mfu": None if peak is None else round(flops / seconds / peak, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if s.device == "cuda" else None,
    }


def sft_section(model: EditModel, s: Settings, guard: Guard) -> None:
    transformer = model.denoiser()
    if hasattr(transformer, "enable_gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    with lora(model, s.lora_rank) as params:
        for side in s.stages:
            guard.run(f"K={s.sft_k} {side}²", lambda side=side: sft_case(model, s, side, params))


# --- the run ----------------------------------------------------------------------------------


def _peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def attention_backend(device: str) -> dict[str, Any]:
    """Which attention kernels were available: diffusers' dispatch backend and torch's SDPA switches."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    info: dict[str, Any] = {"diffusers_backend": str(_AttentionBackendRegistry.get_active_backend()[0].value)}
    if device == "cuda":
        info.update(
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
            mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
            cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled(),
            math_sdp=torch.backends.cuda.math_sdp_enabled(),
        )
    return info


def device_info(s: Settings) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": s.device}
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gb=round(props.total_memory / 1e9, 1), peak_bf16_flops=_peak_flops("cuda"))
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def run(s: Settings) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + s.total_seconds
    report: dict[str, Any] = {"settings": _settings_dict(s), "device": device_info(s)}
    report["attention"] = attention_backend(s.device)
    for name, build, caches in (
        ("qwen-image-edit-2511", build_edit_2511, (False,)),
        ("qwen-image-2.1", build_image_21, (True, False)),
    ):
        entry: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            model = build(s)
            entry["build_seconds"] = round(time.perf_counter() - t0, 2)
            entry["parameters_m"] = round(sum(p.numel() for p in model.denoiser().parameters()) / 1e6, 1)
        except torch.OutOfMemoryError as exc:
            entry["skipped"] = f"out of memory while building: {str(exc).splitlines()[0]}"
            report[name] = entry
            continue
        sampling = Guard("sampling", s.sampling_seconds, deadline)
        sampling_section(model, s, sampling, caches)
        entry["sampling"] = sampling.as_dict()
        sft = Guard("sft", s.sft_seconds, deadline)
        sft_section(model, s, sft)
        entry["sft_lora"] = sft.as_dict()
        report[name] = entry
        del model
        _free()
    report["total_seconds"] = round(time.monotonic() - start, 1)
    return report


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["dtype"] = str(s.dtype).removeprefix("torch.")
    return d


def to_markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [
        "# device_check",
        "",
        f"Device: {dev.get('name')} ({dev['device']}), torch {dev['torch']}; attention: {report['attention']}; "
        f"total {report['total_seconds']} s. Random weights; sampler steps without CFG; text encoder and VAE not run.",
    ]
    for name in ("qwen-image-edit-2511", "qwen-image-2.1"):
        entry = report.get(name, {})
        lines += ["", f"## {name}", ""]
        if "skipped" in entry:
            lines.append(f"Skipped: {entry['skipped']}")
            continue
        lines.append(f"{entry['parameters_m']} M parameters, built in {entry['build_seconds']} s.")
        for section, cols in (
            (
                "sampling",
                ["case", "ref_tokens", "target_tokens", "text_tokens", "steps", "seconds", "seconds_per_step"],
            ),
            ("sft_lora", ["case", "tokens", "seconds", "tokens_per_second", "step_gflops", "mfu", "peak_memory_gb"]),
        ):
            block = entry[section]
            lines += ["", f"### {section}", ""]
            if block["rows"]:
                lines.append(markdown_table(cols, [[row.get(c) for c in cols] for row in block["rows"]]))
            lines += [f"- skipped {sk['case']}: {sk['reason']}" for sk in block["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="shrunken models on CPU (CI)")
    parser.add_argument("--out", type=Path, default=Path("device_check"), help="output folder")
    args = parser.parse_args(argv)
    settings = Settings.smoke() if args.smoke else Settings()
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU, or pass --smoke for the CPU check")
    report = run(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (args.out / "device_check.md").write_text(to_markdown(report))
    print(f"wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'} in {report['total_seconds']} s")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
