import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uniref.errors import ImageInputError
from uniref.images import atomic_path, load_image, load_images, save_image, to_pil, to_rgb, to_tensor


def _write(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _write(img, tmp_path / "rot.jpg", exif=exif)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    loaded = load_image(_write(img, tmp_path / "a.png"))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new(mode, (5, 3))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 3)


def test_palette_with_transparency_goes_over_white(tmp_path: Path) -> None:
    img = Image.new("P", (3, 3), 0)
    img.putpalette([10, 20, 30] + [200, 0, 0] * 255)
    img.info["transparency"] = 0
    loaded = load_image(_write(img, tmp_path / "p.png", transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.full((2, 2), 65535, dtype=np.uint16)
    out = to_rgb(Image.fromarray(arr))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_animated_image_takes_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).getpixel((0, 0))[0] > 200


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_text("hello, not an image"), p)[1], "not an image"),
    ],
)
def test_bad_files_get_one_clear_error_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "bad.png")
    with pytest.raises(ImageInputError, match=message) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_image_is_reported(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uniref.images

    path = _write(Image.new("RGB", (200, 200)), tmp_path / "big.png")
    monkeypatch.setattr(uniref.images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_image(path)


def test_zero_images_is_an_error() -> None:
    with pytest.raises(ImageInputError, match="K = 0"):
        load_images([])


def test_tensor_round_trip_is_exact_for_8_bit_images() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    x = to_tensor(img)
    assert x.shape == (3, 7, 5) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)), arr)
    assert to_pil(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == (255, 255, 255)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.png"
    save_image(Image.new("RGB", (3, 3), (1, 2, 3)), out)
    assert load_image(out).getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_path_keeps_the_usual_mode_when_the_writer_recreates_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "w.safetensors"
    with atomic_path(out) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors replaces the file it is given
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "keep.png"
    save_image(Image.new("RGB", (3, 3), (9, 9, 9)), out)

    class Broken:
        def save(self, *args: object, **kwargs: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_image(Broken(), out)  # type: ignore[arg-type]
    assert load_image(out).getpixel((0, 0)) == (9, 9, 9)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
