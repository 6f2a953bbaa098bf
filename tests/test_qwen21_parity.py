"""Parity with diffusers' QwenImage21Pipeline on tiny random Qwen-Image-2.1 components (fp32, CPU).

Both sides get the same weights (ours through our folder loader and the registry's auto-detection),
references, prompts, seed and guidance; ours runs in ``per_image`` mode with the per-reference budget
equal to diffusers' ``output_resolution``², so the sizes, the noise and the schedule are the same.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import qwen21_tiny
from uniref.budget import Size
from uniref.errors import ModelError
from uniref.models import load_model
from uniref.pipeline import EditPipeline, condition_cache, pack_for_denoising
from uniref.sequence import patchify

RESOLUTION = 64  # diffusers' output_resolution (1024 for the real model): per-reference budget side
TARGET = Size(width=96, height=64)
STEPS = 3
GUIDANCE = 4.0
# The bar for final latents; float32 reorderings between the two paths stay far below it.
TOLERANCE = 1e-5
PROMPT = "put the red circle on the blue square"
NEGATIVE = "blurry"


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


REFS = [_image(48, 32, 1), _image(30, 60, 2), _image(40, 40, 3)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    components = qwen21_tiny.build_components()
    folder = qwen21_tiny.save_folder(components, tmp_path_factory.mktemp("qwen21_tiny"))
    return components, folder


@pytest.fixture(scope="module")
def ours(tiny):
    return EditPipeline.from_pretrained(tiny[1], dtype="fp32", device="cpu")


def _diffusers_latents(components, refs, seed: int, guidance: float, cache: bool, pipe=None) -> torch.Tensor:
    """Final target latents of diffusers' pipeline (``pipe``, default: a new one over ``components``)."""
    pipe = pipe or qwen21_tiny.diffusers_pipeline(components)
    out = pipe(
        prompt=PROMPT,
        image=refs,
        negative_prompt=NEGATIVE if guidance > 1 else None,
        true_cfg_scale=guidance,
        num_inference_steps=STEPS,
        height=TARGET.height,
        width=TARGET.width,
        output_resolution=RESOLUTION,
        use_kv_cache=cache,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images[0]  # (L_target, C) unpatched tokens


def _ours_latents(pipe, refs, seed: int, guidance: float, cache: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(pipe.model, "kv_cache", cache)
    result = pipe.generate(
        PROMPT,
        refs,
        TARGET,
        steps=STEPS,
        guidance=guidance,
        negative=NEGATIVE,
        seed=seed,
        budget=RESOLUTION,
        mode="per_image",
        progress=False,
        decode=False,
    )
    return patchify(result.latents[0], pipe.model.spec.patch_size)


@pytest.mark.parametrize("cache", [False, True], ids=["no_cache", "cache"])
@pytest.mark.parametrize("guidance", [1.0, GUIDANCE], ids=["cfg_off", "cfg_on"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_parity_final_latents_match_diffusers(tiny, ours, k, guidance, cache, monkeypatch):
    refs, seed = REFS[:k], 200 + k
    theirs = _diffusers_latents(tiny[0], refs, seed, guidance, cache)
    mine = _ours_latents(ours, refs, seed, guidance, cache, monkeypatch)
    err = (mine - theirs).abs().max().item()
    print(f"parity qwen-image-2.1 K={k} guidance={guidance} cache={cache}: max abs latent error {err:.2e}")
    assert mine.shape == theirs.shape
    assert err <= TOLERANCE


def _prepared(pipe, k: int, guidance: float = GUIDANCE):
    prep = pipe.prepare(PROMPT, REFS[:k], TARGET, steps=STEPS, guidance=guidance, seed=3, budget=RESOLUTION)
    return prep, pack_for_denoising(prep.sequences, prep.cond, prep.neg_cond)


def _modes(model) -> tuple[list[str | None], object]:
    """Record the kv_cache_mode of every transformer call."""
    seen: list[str | None] = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("kv_cache_mode")), with_kwargs=True
    )
    return seen, hook


@pytest.mark.parametrize("k", [1, 3])
def test_cached_forward_equals_uncached(ours, k):
    model = ours.model
    prep, batch = _prepared(ours, k)
    sigmas = [torch.tensor([0.9]), torch.tensor([0.5]), torch.tensor([0.2])]
    with torch.no_grad():
        plain = [batch.target_tokens(model.velocity(batch, prep.cond, s))[0] for s in sigmas]
        seen, hook = _modes(model)
        try:
            with condition_cache(model):
                cached = [batch.target_tokens(model.velocity(batch, prep.cond, s))[0] for s in sigmas]
        finally:
            hook.remove()
    assert seen == ["extract", "cached", "cached"]
    for a, b in zip(plain, cached, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_cache_is_never_used_with_gradients(ours):
    model = ours.model
    prep, batch = _prepared(ours, 2)
    seen, hook = _modes(model)
    try:
        with condition_cache(model):
            for s in (0.9, 0.5):
                model.velocity(batch, prep.cond, torch.tensor([s]))  # grad enabled: a training forward
    finally:
        hook.remove()
    assert seen == [None, None]


def test_batch_of_mixed_k_and_same_layout_matches_each_request_alone(ours):
    # Requests 0 and 1 share a layout (one grouped, cached transformer call); request 2 has its own.
    kw = dict(steps=2, guidance=GUIDANCE, negative=NEGATIVE, budget=RESOLUTION, mode="per_image", progress=False)
    requests = [(PROMPT, REFS[:2]), (PROMPT, REFS[:2]), ("make it green", REFS[:1])]
    batch = ours.generate(
        [p for p, _ in requests], [r for _, r in requests], TARGET, seed=[5, 6, 7], decode=False, **kw
    )
    for i, (text, refs) in enumerate(requests):
        alone = ours.generate(text, refs, TARGET, seed=5 + i, decode=False, **kw)
        torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=0, atol=1e-5)


def test_self_mode_keeps_reference_tokens_under_one_budget(ours):
    budget = 96
    result = ours.generate(PROMPT, REFS, TARGET, steps=2, guidance=1.0, budget=budget, mode="global", progress=False)
    tokens = sum(s.width * s.height for s in result.ref_plans[0].sizes) // 16**2
    assert tokens <= budget**2 // 16**2
    assert all(s.width % 32 == 0 and s.height % 32 == 0 for s in result.ref_plans[0].sizes)
    assert result.images[0].size == (TARGET.width, TARGET.height)
    assert bool(torch.isfinite(result.latents[0]).all())


def test_folder_is_auto_detected_from_model_index(tiny, ours):
    assert ours.model.name == "qwen-image-2.1"
    assert ours.model.spec.vae_scale == 16 and ours.model.spec.patch_size == 1
    assert ours.model.spec.latent_channels == qwen21_tiny.TINY_Z_DIM
    forced = load_model("qwen-image-2.1", path=tiny[1], dtype="fp32", device="cpu")
    assert forced.name == "qwen-image-2.1"


def test_auto_dtype_is_fp32_on_cpu(tiny):
    assert load_model(tiny[1], device="cpu").dtype == torch.float32


def test_flavour_without_a_path_is_a_model_error():
    with pytest.raises(ModelError, match="pass the local diffusers folder"):
        load_model("qwen-image-2.1")


def test_folder_that_is_not_qwen_image_21_is_a_model_error(tmp_path):
    from uniref.models.qwen_image21 import load_qwen_image_21

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelError, match="not QwenImage21Pipeline"):
        load_qwen_image_21(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImage21Pipeline"}')
    with pytest.raises(ModelError, match="missing component folder"):
        load_qwen_image_21(tmp_path)
