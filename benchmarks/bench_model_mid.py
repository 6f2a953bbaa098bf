"""Mid-size random transformers with the real token geometry, SELF (``global``) vs ``per_image``.

1. Qwen-Image-Edit (``QwenImageTransformer2DModel``): section 1 of ``benchmarks.bench_model``, run
   through ``python -m benchmarks.bench_model``.
2. Qwen-Image-2.1: ``benchmarks.bench_model_21``, which builds on the helpers here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from PIL import Image

from benchmarks._report import markdown_table
from benchmarks._timing import alternate, at_least, at_most, key, median, paired_ratio, random_image, timed
from uniref.budget import PlanMode, Size
from uniref.pipeline import EditPipeline
from uniref.sequence import build_sequence, pack_sequences

if TYPE_CHECKING:
    from benchmarks.bench_model import Settings


# --- 1. mid-size transformer ------------------------------------------------------------------
# Qwen-Image's transformer config (Qwen/Qwen-Image transformer/config.json): 60 layers of 24 heads of
# 128 (width 3072), text width 3584, 64 = 16 latent channels x 2x2 patch in, 16 out, RoPE axes 16/56/56.
REAL_LAYERS = 60
REAL_WIDTH = 24 * 128
MLP_RATIO = 4  # diffusers' FeedForward in QwenImageTransformerBlock
# The mid-size model: the real token geometry, head dim and RoPE axes; depth and heads scaled down so
# that a 29k-token per-image K=6 forward takes seconds. The text width is the tiny Qwen2.5-VL's (16).
MID_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
MID_WIDTH = MID_TRANSFORMER["attention_head_dim"] * MID_TRANSFORMER["num_attention_heads"]
LATENT_CHANNELS = 16  # Qwen-Image VAE z_dim
VAE_SCALE = 8  # Qwen-Image VAE: 8x downsampling (3 stages)
BUDGET_SIDE = 1024
TARGET = Size(width=1024, height=1024)
# Original sizes of the references, in this order: 4:3, 16:9, 9:16, 1:1, 3:2, 2:3.
REF_SIZES = [
    Size(1600, 1200),
    Size(1920, 1080),
    Size(1080, 1920),
    Size(1024, 1024),
    Size(1536, 1024),
    Size(1024, 1536),
]
MID_PROMPT = "put the object from picture 2 on the background of picture 1, keep everything else"
FORWARD_SIGMA = 0.5
# Goals of issue 4, item 6.
GOAL_SELF_GROWTH = 1.3  # SELF time at K=6 over K=1, at most
GOAL_SPEEDUP = 5.0  # per_image time over SELF time at K=6, at least


# --- 1. SELF vs per-image on a mid-size transformer -------------------------------------------


class PatchCodec(torch.nn.Module):
    """Stand-in for ``AutoencoderKLQwenImage`` (or, with ``z_dim=64, scale=16``, the 2.1 VAE) with its
    geometry and interface: scale x scale pixel patches <-> z_dim latent channels by one linear map
    each way. diffusers' VAE, even with 4 base channels, takes seconds per 1024² image on this CPU
    (see the VAE note) and would hide the transformer."""

    def __init__(self, z_dim: int = LATENT_CHANNELS, scale: int = VAE_SCALE) -> None:
        super().__init__()
        self.scale = scale
        # Read by the adapters: z_dim, vae scale = 2 ** len(temperal_downsample), normalisation, and
        # in_channels (the 2.1 VAE reads RGBA when it is 4; this one reads RGB).
        self.config = SimpleNamespace(
            z_dim=z_dim,
            temperal_downsample=[False] + [True] * (scale.bit_length() - 2),
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
            in_channels=3,
        )
        self.enc = torch.nn.Linear(3 * scale * scale, z_dim)
        self.dec = torch.nn.Linear(z_dim, 3 * scale * scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.enc.weight.dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        # (B, 3, T, H, W) -> (B, C, T, H/8, W/8)
        p = self.scale
        z = self.enc(rearrange(x, "b c t (h p) (w q) -> b t h w (c p q)", p=p, q=p))
        z = rearrange(z, "b t h w c -> b c t h w")
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        # (B, C, T, h, w) -> (B, 3, T, 8h, 8w)
        p = self.scale
        x = self.dec(rearrange(z, "b c t h w -> b t h w c"))
        return (rearrange(x, "b t h w (c p q) -> b c t (h p) (w q)", p=p, q=p),)


def build_mid_model(qwen_tiny: ModuleType) -> Any:
    """The mid-size transformer, the tiny Qwen2.5-VL text encoder / tokenizer / processor of
    ``tests/qwen_tiny.py``, and the patch codec, behind our Qwen-Image-Edit adapter."""
    from diffusers import QwenImageTransformer2DModel

    from uniref.models.qwen_image import QwenImageEdit

    tiny = qwen_tiny.build_components(seed=0)
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**MID_TRANSFORMER).eval()
    return QwenImageEdit(
        transformer=transformer,
        vae=PatchCodec().eval(),
        text_encoder=tiny["text_encoder"],
        tokenizer=tiny["tokenizer"],
        image_processor=tiny["image_processor"],
        execution_device=torch.device("cpu"),
    )


def transformer_flops(img_tokens: int, txt_tokens: int, layers: int, width: int) -> float:
    """FLOPs of one joint-attention transformer call: per layer and token 2·(4 + 2·r)·d² for the
    projections (QKV, out, MLP of ratio r) and 4·d·L for QKᵀ and AV over L = image + text tokens."""
    length = img_tokens + txt_tokens
    return layers * (2 * (4 + 2 * MLP_RATIO) * width**2 * length + 4 * width * length**2)


@dataclass
class MidCase:
    k: int
    mode: PlanMode
    img_tokens: int
    txt_tokens: int
    run_forward: Callable[[], Any]


def forward_inputs(pipe: EditPipeline, refs: list[Image.Image], mode: PlanMode, side: int) -> tuple[Any, ...]:
    """Plan (references under ``side``², a ``side``² target), encode the prompt (+ references) and
    pack one SELF batch of random latents: (sequence, packed batch, conditioning)."""
    model = pipe.model
    spec = model.spec
    ref_plan, target = pipe.plan_sizes(refs, size=Size(side, side), budget=side, mode=mode)
    cond = model.encode_condition([MID_PROMPT], [refs], [list(ref_plan.sizes)])
    g = torch.Generator().manual_seed(0)

    def latent(s: Size) -> torch.Tensor:
        return torch.randn(spec.latent_channels, s.height // spec.vae_scale, s.width // spec.vae_scale, generator=g)

    seq = build_sequence(latent(target), [latent(s) for s in ref_plan.sizes], spec.patch_size, spec.centred_positions)
    return seq, pack_sequences([seq], extra_lengths=[cond.txt[0].shape[0]]), cond


def prepare_forward(pipe: EditPipeline, refs: list[Image.Image], mode: PlanMode) -> MidCase:
    """Inputs built once; the timed part is one ``model.velocity`` call, the denoiser call of every
    sampling step."""
    seq, batch, cond = forward_inputs(pipe, refs, mode, BUDGET_SIDE)
    sigma = torch.tensor([FORWARD_SIGMA])

    @torch.no_grad()
    def run_forward() -> torch.Tensor:
        return pipe.model.velocity(batch, cond, sigma)

    return MidCase(len(refs), mode, seq.tokens.shape[0], cond.txt[0].shape[0], run_forward)


def bench_mid(settings: Settings, qwen_tiny: ModuleType) -> dict[str, Any]:
    """The K sweep (global and per_image interleaved per K), then a block of global K=1 / K=max
    pairs only, so that SELF's growth with K is a paired ratio too."""
    torch.manual_seed(0)
    pipe = EditPipeline(build_mid_model(qwen_tiny))
    all_refs = [random_image(s, i) for i, s in enumerate(REF_SIZES)]
    modes = [PlanMode.GLOBAL.value, PlanMode.PER_IMAGE.value]
    cases = {key(k, m): prepare_forward(pipe, all_refs[:k], PlanMode(m)) for k in settings.ks for m in modes}
    cases[key(settings.ks[0], modes[0])].run_forward()  # warm-up (allocator, kernels)

    def run_e2e(k: int, m: str) -> dict[str, float]:
        seconds, result = timed(
            lambda: pipe.generate(
                MID_PROMPT,
                all_refs[:k],
                TARGET,
                steps=settings.e2e_steps,
                guidance=1.0,
                seed=0,
                budget=BUDGET_SIDE,
                mode=m,
                progress=False,
            )
        )
        parts = result.timings.as_dict()
        print(f"e2e K={k} {m}: {seconds:.2f}s", flush=True)
        return {"wall": seconds, **{part: parts[part] for part in ("encode", "denoise", "decode")}}

    def run_forward(k: int, m: str) -> float:
        seconds, _ = timed(cases[key(k, m)].run_forward)
        print(f"forward K={k} {m}: {seconds:.2f}s", flush=True)
        return seconds

    forward: dict[str, list[float]] = {name: [] for name in cases}
    e2e: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for r in range(settings.forward_repeats):
        for i, k in enumerate(settings.ks):
            for m in alternate(modes, r + i):
                forward[key(k, m)].append(run_forward(k, m))
    for r in range(settings.e2e_repeats):
        for i, k in enumerate(settings.ks):
            for m in alternate(modes, r + i + 1):
                e2e[key(k, m)].append(run_e2e(k, m))

    g, ends = modes[0], [settings.ks[0], settings.ks[-1]]
    growth: dict[str, list[float]] = {"forward": [], "e2e": []}
    for r in range(settings.growth_repeats):
        pair = {}
        for k in alternate(ends, r + 1):
            pair[k] = run_forward(k, g)
            forward[key(k, g)].append(pair[k])
        growth["forward"].append(pair[ends[1]] / pair[ends[0]])
    for r in range(settings.growth_e2e_repeats):
        runs = {}
        for k in alternate(ends, r + 1):
            runs[k] = run_e2e(k, g)
            e2e[key(k, g)].append(runs[k])
        growth["e2e"].append(runs[ends[1]]["wall"] / runs[ends[0]]["wall"])
    return {
        "tokens": {name: {"img": c.img_tokens, "txt": c.txt_tokens} for name, c in cases.items()},
        "forward": forward,
        "e2e": e2e,
        "growth": growth,
        "vae": probe_vae() if settings.vae_probe else None,
        "default_steps": pipe.model.default_steps,
        "cfg": pipe.model.default_guidance > 1.0,
    }


def probe_vae() -> dict[str, float]:
    """One encode and one decode of a 1024² image by diffusers' Qwen-Image VAE architecture at
    4 base channels (z_dim 16, 8x): the cost the patch codec stands in for."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    x = torch.rand(1, 3, 1, TARGET.height, TARGET.width) * 2 - 1
    with torch.no_grad():
        vae.decode(vae.encode(x[..., :64, :64]).latent_dist.mode())  # warm-up
        enc, z = timed(lambda: vae.encode(x).latent_dist.mode())
        dec, _ = timed(lambda: vae.decode(z))
    return {"encode": enc, "decode": dec}


def mid_section(settings: Settings, res: dict[str, Any]) -> tuple[str, dict[str, float]]:
    tokens, forward = res["tokens"], res["forward"]
    e2e = {name: [x["wall"] for x in runs] for name, runs in res["e2e"].items()}
    g, p = PlanMode.GLOBAL.value, PlanMode.PER_IMAGE.value
    k1, kmax = settings.ks[0], settings.ks[-1]
    mid, real = (MID_TRANSFORMER["num_layers"], MID_WIDTH), (REAL_LAYERS, REAL_WIDTH)

    def flops_ratio(a: str, b: str, dims: tuple[int, int]) -> float:
        return transformer_flops(tokens[a]["img"], tokens[a]["txt"], *dims) / transformer_flops(
            tokens[b]["img"], tokens[b]["txt"], *dims
        )

    passes = 2 if res["cfg"] else 1  # true CFG: a negative encode and a second forward per step
    sampling = f"{res['default_steps']} steps" + (" + CFG" if res["cfg"] else "")

    def projected(name: str) -> float:
        """Default sampling from the measured parts: passes x (encode + steps x forward) + decode."""
        runs = res["e2e"][name]
        encode, decode = median([x["encode"] for x in runs]), median([x["decode"] for x in runs])
        return passes * (encode + res["default_steps"] * median(forward[name])) + decode

    def split(name: str) -> str:
        runs = res["e2e"][name]
        return " / ".join(f"{median([x[part] for x in runs]):.2f}" for part in ("encode", "denoise", "decode"))

    fwd_rows, e2e_rows = [], []
    for k in settings.ks:
        kg, kp, g1 = key(k, g), key(k, p), key(k1, g)
        fwd_rows.append(
            [
                k,
                f"{tokens[kg]['img']} + {tokens[kg]['txt']}",
                f"{tokens[kp]['img']} + {tokens[kp]['txt']}",
                f"{median(forward[kg]):.2f}",
                f"{median(forward[kp]):.2f}",
                f"**{paired_ratio(forward[kp], forward[kg]):.2f}×**",
                f"{median(forward[kg]) / median(forward[g1]):.2f}×",
                f"{flops_ratio(kp, kg, mid):.2f}×",
                f"{flops_ratio(kp, kg, real):.2f}×",
            ]
        )
        e2e_rows.append(
            [
                k,
                f"{median(e2e[kg]):.2f}",
                split(kg),
                f"{median(e2e[kp]):.2f}",
                split(kp),
                f"**{paired_ratio(e2e[kp], e2e[kg]):.2f}×**",
                f"{median(e2e[kg]) / median(e2e[g1]):.2f}×",
                f"{projected(kg):.0f} / {projected(kp):.0f}",
                f"{projected(kp) / projected(kg):.2f}×",
                f"{projected(kg) / projected(g1):.2f}×",
            ]
        )
    g1, gmax, pmax = key(k1, g), key(kmax, g), key(kmax, p)
    summary = {
        "fwd_self_growth": median(res["growth"]["forward"]),
        "fwd_growth_pairs": len(res["growth"]["forward"]),
        "fwd_speedup": paired_ratio(forward[pmax], forward[gmax]),
        "e2e_self_growth": median(res["growth"]["e2e"]),
        "e2e_growth_pairs": len(res["growth"]["e2e"]),
        "mid_flops_growth": flops_ratio(gmax, g1, mid),
        "e2e_speedup": paired_ratio(e2e[pmax], e2e[gmax]),
        "real_flops_speedup": flops_ratio(pmax, gmax, real),
        "real_flops_growth": flops_ratio(gmax, g1, real),
        "txt_k1": tokens[g1]["txt"],
        "txt_kmax": tokens[gmax]["txt"],
        "proj_self_growth": projected(gmax) / projected(g1),
        "proj_speedup": projected(pmax) / projected(gmax),
    }
    fwd_table = markdown_table(
        [
            "K",
            "global tokens (img + txt)",
            "per_image tokens (img + txt)",
            "forward global (s)",
            "forward per_image (s)",
            "per_image / global",
            "global vs K=1",
            "FLOPs per_image / global, this model",
            "FLOPs per_image / global, real Qwen-Image dims",
        ],
        fwd_rows,
    )
    e2e_table = markdown_table(
        [
            "K",
            "global (s)",
            "global encode / denoise / decode",
            "per_image (s)",
            "per_image encode / denoise / decode",
            "per_image / global",
            "global vs K=1",
            f"projected {sampling}: global / per_image (s)",
            "projected per_image / global",
            "projected global vs K=1",
        ],
        e2e_rows,
    )
    text = (
        f"{fwd_table}\n\nEnd to end: `pipe.generate` at {settings.e2e_steps} step(s), CFG off, decode included, "
        f"{settings.e2e_repeats} run(s) per arm and K ({settings.e2e_repeats + settings.growth_e2e_repeats} for "
        f"global K={k1} and K={kmax}). The projected columns put the measured encode, forward and decode medians "
        f"together for the adapter's default sampling ({sampling}): "
        f"{passes} × (encode + {res['default_steps']} × forward) + decode.\n\n{e2e_table}"
    )
    return text, summary


def mid_goals_text(settings: Settings, s: dict[str, float]) -> str:
    k1, kmax = settings.ks[0], settings.ks[-1]
    growth, speedup = GOAL_SELF_GROWTH, GOAL_SPEEDUP
    return f"""Goals (K={kmax} vs K={k1}):
- SELF K={kmax} / K={k1} time ≤ {growth}× (median of {s["fwd_growth_pairs"]} forward and {s["e2e_growth_pairs"]}
  end-to-end interleaved K={k1} / K={kmax} pairs run after the sweep): forward **{s["fwd_self_growth"]:.2f}×**
  {at_most(s["fwd_self_growth"], growth)}; end to end at {settings.e2e_steps} step(s)
  **{s["e2e_self_growth"]:.2f}×** {at_most(s["e2e_self_growth"], growth)}; projected at the default sampling
  **{s["proj_self_growth"]:.2f}×** {at_most(s["proj_self_growth"], growth)}. Image tokens stay ≈ constant; text
  tokens grow from {s["txt_k1"]} to {s["txt_kmax"]} (the VL encoder's vision tokens of each reference), and
  encoding K references costs more than one, which weighs most when there are few steps. The FLOPs grow
  {s["mid_flops_growth"]:.2f}× in this model and {s["real_flops_growth"]:.2f}× at the real dims.
- SELF ≥ {speedup}× faster than `per_image` at K={kmax}: forward **{s["fwd_speedup"]:.2f}×**
  {at_least(s["fwd_speedup"], speedup)}; end to end **{s["e2e_speedup"]:.2f}×** {at_least(s["e2e_speedup"], speedup)};
  projected **{s["proj_speedup"]:.2f}×** {at_least(s["proj_speedup"], speedup)}; the FLOP ratio at the real dims
  is **{s["real_flops_speedup"]:.2f}×** {at_least(s["real_flops_speedup"], speedup)}."""
