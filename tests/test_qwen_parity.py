"""Parity with diffusers' QwenImageEditPlusPipeline on tiny random components (fp32, CPU).

Both pipelines get the same weights (ours through our folder loader), references, prompts, seed and
true CFG; ours runs in ``per_image`` mode. diffusers' per-image sizes are shrunk (monkeypatched
module constants) and ours given the same budgets, so each case takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import qwen_tiny
from uniref.budget import Size
from uniref.errors import ModelError
from uniref.pipeline import EditPipeline
from uniref.sequence import patchify

VAE_SIDE = 96  # per-reference VAE budget side (diffusers' VAE_IMAGE_SIZE is 1024²)
CONDITION_SIDE = 56  # per-reference VL budget side (diffusers' CONDITION_IMAGE_SIZE is 384²)
TARGET = Size(width=64, height=96)
STEPS = 3
GUIDANCE = 4.0
# The bar the parity claim states (measured: about 2e-6 on this CPU, fp32).
TOLERANCE = 1e-5
PROMPT = "put the red circle on the blue square"
NEGATIVE = "blurry"


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


REFS = [_image(48, 32, 1), _image(30, 60, 2), _image(40, 40, 3)]


@pytest.fixture(scope="module", params=[False, True], ids=["2509", "2511_zero_cond_t"])
def tiny(request, tmp_path_factory):
    components = qwen_tiny.build_components(zero_cond_t=request.param)
    folder = qwen_tiny.save_folder(components, tmp_path_factory.mktemp("qwen_tiny"))
    return components, folder


def _diffusers_latents(components, refs, seed, monkeypatch) -> torch.Tensor:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qie

    monkeypatch.setattr(qie, "VAE_IMAGE_SIZE", VAE_SIDE * VAE_SIDE)
    monkeypatch.setattr(qie, "CONDITION_IMAGE_SIZE", CONDITION_SIDE * CONDITION_SIDE)
    pipe = qwen_tiny.diffusers_pipeline(components)
    out = pipe(
        image=refs,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        true_cfg_scale=GUIDANCE,
        num_inference_steps=STEPS,
        height=TARGET.height,
        width=TARGET.width,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images[0]  # (L_target, C·4) packed tokens


@pytest.fixture(scope="module")
def ours(tiny):
    _, folder = tiny
    return EditPipeline.from_pretrained(
        folder, dtype="fp32", device="cpu", condition_size=CONDITION_SIDE * CONDITION_SIDE
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_parity_final_latents_match_diffusers(tiny, ours, k, monkeypatch):
    components, _ = tiny
    refs, seed = REFS[:k], 100 + k
    theirs = _diffusers_latents(components, refs, seed, monkeypatch)
    result = ours.generate(
        PROMPT,
        refs,
        TARGET,
        steps=STEPS,
        guidance=GUIDANCE,
        negative=NEGATIVE,
        seed=seed,
        budget=VAE_SIDE,
        mode="per_image",
        progress=False,
        decode=False,
    )
    mine = patchify(result.latents[0], ours.model.spec.patch_size)
    err = (mine - theirs).abs().max().item()
    print(f"parity {ours.model.name} K={k}: max abs latent error {err:.2e}")
    assert mine.shape == theirs.shape
    assert err <= TOLERANCE


def test_parity_batch_of_mixed_k_matches_each_request_alone(ours):
    # Different K (and so different grids) go through separate transformer groups; the batch must
    # equal the requests run one by one.
    kw = dict(steps=2, guidance=GUIDANCE, negative=NEGATIVE, budget=VAE_SIDE, mode="per_image", progress=False)
    batch = ours.generate([PROMPT, "make it green"], [REFS[:2], REFS[:1]], TARGET, seed=[5, 6], decode=False, **kw)
    for i, (text, refs) in enumerate([(PROMPT, REFS[:2]), ("make it green", REFS[:1])]):
        alone = ours.generate(text, refs, TARGET, seed=5 + i, decode=False, **kw)
        torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=0, atol=1e-5)


def test_parity_same_grids_batch_with_padded_text_matches_alone(ours):
    # Same image grids but different prompt lengths: one transformer call with a text mask.
    kw = dict(steps=2, guidance=GUIDANCE, negative=NEGATIVE, budget=VAE_SIDE, mode="per_image", progress=False)
    prompts = [PROMPT, "red"]
    batch = ours.generate(prompts, [REFS[:1], REFS[:1]], TARGET, seed=[7, 8], decode=False, **kw)
    for i, text in enumerate(prompts):
        alone = ours.generate(text, REFS[:1], TARGET, seed=7 + i, decode=False, **kw)
        torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=0, atol=1e-5)


def test_folder_variant_comes_from_transformer_config(tiny, ours):
    components, _ = tiny
    expected = components["transformer"].config.zero_cond_t
    assert ours.model.zero_cond_t == expected
    assert ours.model.name == ("qwen-image-edit-2511" if expected else "qwen-image-edit-2509")


def test_decoded_image_has_the_target_size(ours):
    images = ours("make it green", REFS[:1], TARGET, steps=1, guidance=1.0, budget=VAE_SIDE, progress=False)
    assert images[0].size == (TARGET.width, TARGET.height)


def test_folder_that_is_not_qwen_image_edit_is_a_model_error(tmp_path):
    from uniref.models.qwen_image import load_qwen_image_edit

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelError, match="not a Qwen-Image-Edit pipeline"):
        load_qwen_image_edit(tmp_path)
    with pytest.raises(ModelError, match="no model_index.json"):
        load_qwen_image_edit(tmp_path / "nowhere")


def _copy_with_edited_transformer(folder, tmp_path, edit):
    import shutil

    import safetensors.torch as st

    copy = shutil.copytree(folder, tmp_path / "copy")
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = st.load_file(weights)
    edit(state)
    st.save_file(state, weights)
    return copy


def test_checkpoint_missing_weights_is_a_model_error(tiny, tmp_path):
    from uniref.models.qwen_image import load_qwen_image_edit

    copy = _copy_with_edited_transformer(tiny[1], tmp_path, lambda s: s.pop("img_in.bias"))
    with pytest.raises(ModelError, match="lacks 1 weight.*img_in.bias"):
        load_qwen_image_edit(copy, dtype="fp32", device="cpu")


def test_checkpoint_unexpected_weights_are_reported(tiny, tmp_path, caplog):
    from uniref.models.qwen_image import load_qwen_image_edit

    copy = _copy_with_edited_transformer(tiny[1], tmp_path, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with caplog.at_level("WARNING", logger="uniref.models.qwen_image"):
        model = load_qwen_image_edit(copy, dtype="fp32", device="cpu")
    assert "extra.weight" in caplog.text
    assert model.spec.latent_channels == qwen_tiny.TINY_Z_DIM


@pytest.mark.parametrize("flavour", ["qwen-image-edit-2509", "qwen-image-edit-2511"])
def test_registry_flavour_forces_the_variant(tiny, flavour):
    from uniref.models import load_model

    model = load_model(flavour, path=tiny[1], dtype="fp32", device="cpu")
    assert model.name == flavour
    assert model.zero_cond_t == (flavour == "qwen-image-edit-2511")
    assert model.transformer.config.zero_cond_t == model.zero_cond_t


def test_registry_flavour_without_a_path_is_a_model_error():
    from uniref.models import load_model

    with pytest.raises(ModelError, match="pass the local diffusers folder"):
        load_model("qwen-image-edit-2511")


def test_self_condition_size_is_28_of_every_32_pixels(ours, monkeypatch):
    monkeypatch.setattr(ours.model, "condition_size", "self")
    assert ours.model.condition_image_size(REFS[0], Size(width=128, height=96)) == Size(width=112, height=84)
    # The VL encoder then sees exactly (112/28)·(84/28) = 12 merged vision tokens for that reference.
    cond = ours.model.encode_condition(["x"], [[REFS[0]]], [[Size(width=128, height=96)]])
    monkeypatch.setattr(ours.model, "condition_size", 32 * 32)
    small = ours.model.encode_condition(["x"], [[REFS[0]]], [[Size(width=128, height=96)]])
    assert cond.txt[0].shape[0] - small.txt[0].shape[0] == 12 - 4


def test_default_dtype_is_auto_fp32_on_cpu(tiny):
    # "auto": bf16 only on a GPU that has it; bf16 on CPU is emulated and far slower.
    pipe = EditPipeline.from_pretrained(tiny[1], device="cpu", condition_size=CONDITION_SIDE**2)
    assert pipe.model.dtype == torch.float32


def test_schedule_is_read_from_the_folder_scheduler_config(ours):
    assert ours.model.spec.schedule.max_seq_len == qwen_tiny.QWEN_SCHEDULER_CONFIG["max_image_seq_len"]
    assert ours.model.spec.schedule.shift_terminal == qwen_tiny.QWEN_SCHEDULER_CONFIG["shift_terminal"]


def test_bf16_load_runs_to_a_finite_image(tiny):
    pipe = EditPipeline.from_pretrained(tiny[1], dtype="bf16", device="cpu", condition_size=CONDITION_SIDE**2)
    assert pipe.model.dtype == torch.bfloat16
    result = pipe.generate("x", REFS[:2], TARGET, steps=2, guidance=GUIDANCE, budget=VAE_SIDE, progress=False)
    assert result.latents[0].dtype == torch.bfloat16
    assert bool(torch.isfinite(result.latents[0].float()).all())
    assert result.images[0].size == (TARGET.width, TARGET.height)
