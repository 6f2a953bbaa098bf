from pathlib import Path

import pytest
import torch

from uniref.errors import ModelError
from uniref.models.codec import (
    Codec,
    CodecConfig,
    load_codec,
    reconstruction_psnr,
    save_codec,
    scene_crops,
    train_codec,
)
from uniref.models.tiny import BUNDLED, TinyConfig, build_tiny, load_tiny_folder

WORDS = ("put", "the", "red", "circle", "from", "picture", "on", "background", "of", "1", "2", "3")
SMALL_CODEC = CodecConfig(channels=4, width=4, levels=3)


def _codec_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    codec = Codec(SMALL_CODEC)
    codec.mean.normal_()
    codec.std.uniform_(0.5, 2.0)
    return save_codec(codec, tmp_path / "codec")


def test_codec_saves_and_loads_the_same_function_with_its_latent_statistics(tmp_path: Path) -> None:
    folder = _codec_folder(tmp_path)
    a, b = load_codec(folder), load_codec(folder)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = a.encode(x)
    assert z.shape == (2, 4, 2, 3)
    torch.testing.assert_close(z, b.encode(x))
    torch.testing.assert_close(a.decode(z), b.decode(z))
    assert not any(p.requires_grad for p in a.parameters())  # frozen: the trainer never sees it


def test_a_codec_folder_that_is_not_one_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a readable UniRef codec"):
        load_codec(tmp_path)


def test_training_the_codec_reduces_reconstruction_error_on_held_out_scenes(tmp_path: Path) -> None:
    held_out = scene_crops(123, 16, 24)
    before = reconstruction_psnr(Codec(SMALL_CODEC), held_out)
    codec, psnr = train_codec(tmp_path / "c", minutes=10, config=SMALL_CODEC, batch=8, side=24, max_steps=60)
    assert reconstruction_psnr(codec, held_out) > before + 1.5
    assert (tmp_path / "c" / "codec.safetensors").exists() and psnr > before


def test_shipped_codec_reconstructs_scene_images() -> None:
    # The codec the default model uses (issue 17 §6: round-trip error on scene images).
    codec = load_codec(Path(__file__).resolve().parent.parent / "src" / "uniref" / "assets" / "codec")
    assert reconstruction_psnr(codec, scene_crops(7, 64, 48)) >= 27.0


def test_tiny_model_with_a_codec_bundles_it_and_reloads_identically(tmp_path: Path) -> None:
    config = TinyConfig(vocabulary=WORDS, width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1,
                        mlp_ratio=2, patch=1, codec=str(_codec_folder(tmp_path)))  # fmt: skip
    model = build_tiny(config, seed=3)
    assert model.spec.latent_channels == 4 and model.spec.token_pixels == 8 and model.spec.plan_multiple == 8
    img = torch.rand(3, 16, 24) * 2 - 1
    lat = model.encode_images([img])[0]
    model.save(tmp_path / "m")
    loaded = load_tiny_folder(tmp_path / "m")
    assert loaded.config.codec == BUNDLED
    torch.testing.assert_close(loaded.encode_images([img])[0], lat)
    torch.testing.assert_close(loaded.decode_latents([lat])[0], model.decode_latents([lat])[0])
    with pytest.raises(ModelError, match="bundled"):
        build_tiny(loaded.config)


def test_tiny_codec_encodes_a_mixed_batch_per_shape_as_it_would_one_image_at_a_time(tmp_path: Path) -> None:
    config = TinyConfig(vocabulary=WORDS, width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1,
                        mlp_ratio=2, patch=1, codec=str(_codec_folder(tmp_path)))  # fmt: skip
    model = build_tiny(config, seed=3)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) * 2 - 1 for h, w in ((16, 24), (16, 16), (16, 24), (8, 32))]
    batched = model.encode_images(images)
    for img, lat in zip(images, batched, strict=True):
        torch.testing.assert_close(lat, model.encode_images([img])[0], atol=1e-5, rtol=1e-5)
    decoded = model.decode_latents(batched)
    for lat, out in zip(batched, decoded, strict=True):
        assert out.shape[1:] == (lat.shape[1] * 8, lat.shape[2] * 8)
        torch.testing.assert_close(out, model.decode_latents([lat])[0], atol=1e-5, rtol=1e-5)
