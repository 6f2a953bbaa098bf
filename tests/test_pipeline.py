"""EditPipeline against a tiny fake EditModel: batching, determinism, isolation of packed samples."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uniref.budget import Size
from uniref.models.base import Conditioning, EditModel, LatentSpec, ScheduleSpec
from uniref.pipeline import EditPipeline
from uniref.sequence import PAD, PackedBatch, attention_mask, patchify

CODEC_SCALE = 2  # pixel-unshuffle factor of the fake codec
CHANNELS = 3 * CODEC_SCALE * CODEC_SCALE
PATCH = 2
TOKEN_DIM = CHANNELS * PATCH * PATCH
TXT_DIM = 8


class FakeModel(EditModel):
    """Identity codec (pixel-unshuffle) and a random velocity that mixes tokens within each sample
    (masked mean over the sample's tokens and its text), so any leak across packed samples shows."""

    name = "fake"

    def __init__(self) -> None:
        self.spec = LatentSpec(
            latent_channels=CHANNELS,
            vae_scale=CODEC_SCALE,
            patch_size=PATCH,
            plan_multiple=8,
            ref_budget=32 * 32,
            target_budget=24 * 24,
            schedule=ScheduleSpec(base_seq_len=4, max_seq_len=64),
        )
        g = torch.Generator().manual_seed(0)
        self.w_self = torch.randn(TOKEN_DIM, TOKEN_DIM, generator=g) / TOKEN_DIM**0.5
        self.w_ctx = torch.randn(TOKEN_DIM, TOKEN_DIM, generator=g) / TOKEN_DIM**0.5
        self.w_txt = torch.randn(TXT_DIM, TOKEN_DIM, generator=g)
        self.w_pos = torch.randn(3, TOKEN_DIM, generator=g) * 0.1
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode_condition(self, instructions, refs, ref_sizes) -> Conditioning:
        # One text token per word (a hashed embedding) plus one per reference, sized by its plan.
        txt = []
        for text, sizes in zip(instructions, ref_sizes, strict=True):
            rows = [_word_embedding(w) for w in text.split()] or [torch.zeros(TXT_DIM)]
            rows += [torch.full((TXT_DIM,), s.area / 1000.0) for s in sizes]
            txt.append(torch.stack(rows))
        return Conditioning(txt)

    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [F.pixel_unshuffle(img, CODEC_SCALE) for img in images]

    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [F.pixel_shuffle(lat, CODEC_SCALE) for lat in latents]

    def velocity(self, batch: PackedBatch, cond: Conditioning, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = batch.tokens.values  # (R, L, D)
        ids = batch.sample_ids  # (R, L)
        mask = attention_mask(ids)[:, 0].float()  # (R, L, L)
        ctx = mask @ x / mask.sum(-1, keepdim=True)  # (R, L, D): mean over the token's own sample
        txt_mean = torch.stack([t.mean(0) for t in cond.txt]) @ self.w_txt  # (B, D)
        safe = ids.clamp(min=0)
        per_token = txt_mean[safe] * sigma[safe][..., None]  # (R, L, D)
        v = torch.tanh(x @ self.w_self) + ctx @ self.w_ctx + per_token + batch.position_ids.float() @ self.w_pos
        return v * (ids != PAD)[..., None]

    def denoiser(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def set_denoiser(self, module: torch.nn.Module) -> None:
        raise NotImplementedError("the fake model has nothing to train")


def _word_embedding(word: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(word)) % 2**31)
    return torch.randn(TXT_DIM, generator=g)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


REQUESTS = [
    ("make it red", [_image(40, 24, 1)], None),
    ("put the circle on the square", [_image(16, 16, 2), _image(30, 20, 3), _image(20, 36, 4)], Size(32, 16)),
    ("swap", [_image(24, 24, 5), _image(48, 16, 6)], None),
]


@pytest.fixture
def pipe() -> EditPipeline:
    return EditPipeline(FakeModel())


def _run(pipe, requests, **kw):
    return pipe.generate(
        [r[0] for r in requests],
        [r[1] for r in requests],
        [r[2] for r in requests],
        steps=3,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("mode", ["global", "per_image"])
def test_batch_with_mixed_k_and_sizes_equals_each_request_alone(pipe, mode):
    batched = _run(pipe, REQUESTS, seed=7, mode=mode, guidance=3.0)
    for i, (text, refs, size) in enumerate(REQUESTS):
        alone = pipe.generate(text, refs, size, steps=3, seed=7 + i, mode=mode, guidance=3.0, progress=False)
        torch.testing.assert_close(batched.latents[i], alone.latents[0], rtol=1e-5, atol=1e-5)
        assert batched.target_sizes[i] == alone.target_sizes[0]


def test_same_seed_gives_identical_images(pipe):
    a = _run(pipe, REQUESTS, seed=3)
    b = _run(pipe, REQUESTS, seed=3)
    for x, y in zip(a.latents, b.latents, strict=True):
        assert torch.equal(x, y)
    assert [img.tobytes() for img in a.images] == [img.tobytes() for img in b.images]


def test_different_seeds_give_different_outputs(pipe):
    a = pipe.generate("make it red", REQUESTS[0][1], steps=2, seed=1, progress=False)
    b = pipe.generate("make it red", REQUESTS[0][1], steps=2, seed=2, progress=False)
    assert not torch.allclose(a.latents[0], b.latents[0])


def test_noise_equals_diffusers_randn_tensor_for_the_seed(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    noise = pipe._noise(Size(24, 16), seed=11)
    expected = randn_tensor((1, 1, CHANNELS, 8, 12), generator=torch.Generator().manual_seed(11))
    assert torch.equal(noise, expected[0, 0])


def test_samples_packed_in_one_row_do_not_leak_into_each_other(pipe):
    one_row = 1000  # tokens: room for all three requests (and their text) in a single row
    base = _run(pipe, REQUESTS, seed=5, capacity=one_row)
    assert pipe.last_packing == [[1, 0, 2]]
    changed = list(REQUESTS)
    changed[2] = ("something else entirely", [_image(24, 24, 50), _image(16, 48, 60)], Size(16, 16))
    other = _run(pipe, changed, seed=5, capacity=one_row)
    assert len(pipe.last_packing) == 1
    for i in (0, 1):
        torch.testing.assert_close(base.latents[i], other.latents[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.latents[2][:, :4, :4], other.latents[2][:, :4, :4])


def test_one_row_packing_equals_one_row_per_sample(pipe):
    packed = _run(pipe, REQUESTS, seed=9, capacity=1000, guidance=2.0)
    separate = _run(pipe, REQUESTS, seed=9, guidance=2.0)
    for a, b in zip(packed.latents, separate.latents, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_global_mode_keeps_references_within_budget(pipe):
    result = _run(pipe, REQUESTS, seed=0, mode="global")
    assert all(p.total_pixels <= pipe.model.spec.ref_budget for p in result.ref_plans)
    assert [img.size for img in result.images] == [(s.width, s.height) for s in result.target_sizes]


def test_per_image_target_follows_last_reference_like_diffusers(pipe):
    result = _run(pipe, REQUESTS, seed=0, mode="per_image")
    # Request 0 has no explicit size: calculate_dimensions(576, 40/24) at multiple 8 is 32x16.
    assert result.target_sizes[0] == Size(32, 16)
    assert result.target_sizes[1] == Size(32, 16)  # explicit sizes are kept (rounded down)


def test_guidance_one_skips_the_unconditional_branch(pipe):
    pipe.generate("make it red", REQUESTS[0][1], steps=4, guidance=1.0, progress=False)
    assert pipe.model.calls == 4
    pipe.generate("make it red", REQUESTS[0][1], steps=4, guidance=2.0, progress=False)
    assert pipe.model.calls == 4 + 8


def test_timings_are_reported(pipe):
    images = pipe(["a", "b"], [[_image(16, 16, 1)], [_image(16, 16, 2)]], steps=2, progress=False)
    assert len(images) == 2
    t = pipe.last_timings.as_dict()
    assert set(t) == {"load", "encode", "denoise", "decode", "total"}
    assert t["denoise"] > 0 and t["total"] >= t["denoise"]


def test_batch_length_mismatch_is_an_error(pipe):
    with pytest.raises(ValueError, match="2 instructions but 1 reference lists"):
        pipe(["a", "b"], [[_image(16, 16, 1)]], progress=False)


def test_target_like_sets_the_output_aspect_at_the_target_budget(pipe):
    refs = [_image(48, 48, 0), _image(40, 80, 1)]
    result = pipe.generate("put", refs, steps=1, progress=False, target_like=Size(300, 100))
    target = result.target_sizes[0]
    assert target.area <= pipe.model.spec.target_budget
    assert abs(target.aspect / 3.0 - 1) < 0.35  # 3:1 at the budget, not the last reference's 1:2


def test_on_step_sees_every_step_and_its_last_euler_update_gives_the_output(pipe):
    seen: list[tuple[int, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []
    result = _run(pipe, REQUESTS, seed=1, guidance=2.0, on_step=lambda i, s, xs, v: seen.append((i, s, xs, v)))
    assert [i for i, *_ in seen] == [0, 1, 2]
    step, sigma, xs, vs = seen[-1]
    for b, (x, v) in enumerate(zip(xs, vs, strict=True)):
        assert sigma.shape == (len(REQUESTS),)
        final = x - result.sigmas[b][step] * v  # the last Euler step lands on sigma 0
        assert result.sigmas[b][step + 1] == 0
        expected = patchify(result.latents[b], pipe.model.spec.patch_size)
        torch.testing.assert_close(final.to(expected.dtype), expected, rtol=1e-5, atol=1e-5)


def test_generate_is_prepare_then_denoise(pipe):
    result = _run(pipe, REQUESTS, seed=2)
    prep = pipe.prepare([r[0] for r in REQUESTS], [r[1] for r in REQUESTS], [r[2] for r in REQUESTS], steps=3, seed=2)
    final = pipe.denoise(prep)
    for b, seq in enumerate(prep.sequences):
        torch.testing.assert_close(seq.target_latent(final[b]), result.latents[b])
