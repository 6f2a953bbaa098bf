"""The model benchmark's stand-ins (benchmarks/bench_model_mid.py) still fit the code they measure (the
benchmark takes minutes; these take seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import _timing as timing  # noqa: E402  (our own modules: a moved file must fail, not skip)
from benchmarks import bench_model_mid as bench  # noqa: E402

from uniref.budget import Size  # noqa: E402
from uniref.pipeline import EditPipeline  # noqa: E402


@pytest.fixture(scope="module")
def mid_pipe():
    return EditPipeline(bench.build_mid_model(timing.load_qwen_tiny()))


def test_patch_codec_gives_the_qwen_vae_geometry_through_our_adapter(mid_pipe):
    model = mid_pipe.model
    assert (model.spec.latent_channels, model.spec.vae_scale, model.spec.token_pixels) == (16, 8, 16)
    image = torch.rand(3, 48, 64) * 2 - 1
    (latent,) = model.encode_images([image])
    assert latent.shape == (16, 6, 8)
    (decoded,) = model.decode_latents([latent])
    assert decoded.shape == (3, 48, 64)


def test_mid_size_model_runs_one_step_end_to_end_in_both_modes(mid_pipe):
    refs = [Image.new("RGB", (96, 64), "red"), Image.new("RGB", (64, 96), "blue")]
    pixels = {}
    for mode in ("global", "per_image"):
        result = mid_pipe.generate("x", refs, Size(64, 64), steps=1, guidance=1.0, budget=64, mode=mode, progress=False)
        assert result.images[0].size == (64, 64)
        pixels[mode] = result.ref_plans[0].total_pixels
    assert pixels["global"] <= 64 * 64 < pixels["per_image"]  # SELF shares the budget; per_image gives it to each


def test_transformer_flops_is_the_closed_form():
    # 1 layer, width 2, 3 image + 1 text tokens: 2·(4 + 8)·4·4 projections + 4·2·16 attention.
    assert bench.transformer_flops(3, 1, layers=1, width=2) == 2 * 12 * 4 * 4 + 4 * 2 * 16
    assert bench.transformer_flops(3, 1, layers=5, width=2) == 5 * bench.transformer_flops(3, 1, layers=1, width=2)
