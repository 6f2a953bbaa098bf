"""Image input and output, one place for every command.

Reading: EXIF orientation is applied, the first frame of an animation is taken, and every mode is
converted to RGB by one rule: transparency (RGBA, LA, P with a transparent colour) is composited
over white; 16-bit and float greyscale are scaled to 8 bits; CMYK and others go through PIL's
converter. Anything unusable raises :class:`ImageInputError` naming the file.

Writing is atomic: a temporary file in the same folder, fsync, then rename, so a reader never sees
half an image and an interrupted write never destroys the previous file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from uniref.budget import Size
from uniref.errors import ImageInputError

# PIL's own limit on pixels per image (≈ 179 MP, 2x its warning threshold) guards against
# decompression bombs; we keep it and turn its warning into an error too.
MAX_IMAGE_PIXELS = 2 * 89_478_485
BACKGROUND = (255, 255, 255)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open ``path`` as an RGB image with EXIF orientation applied (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageInputError(f"{path}: empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{path}: too many pixels ({exc}); refusing a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"{path}: truncated or corrupt image ({exc})") from None


def load_images(paths: Sequence[str | os.PathLike[str]]) -> list[Image.Image]:
    """Load K >= 1 images; K = 0 is an error."""
    if not paths:
        raise ImageInputError("no reference images given (K = 0): pass at least one image")
    return [load_image(p) for p in paths]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def image_size(img: Image.Image) -> Size:
    return Size(width=img.width, height=img.height)


def resize(img: Image.Image, size: Size) -> Image.Image:
    """Resize with a filter chosen for quality in both directions (LANCZOS, as diffusers does)."""
    if image_size(img) == size:
        return img
    return img.resize((size.width, size.height), Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image."""
    arr = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600), and some writers (safetensors) recreate it that way;
        # a finished output gets the usual mode for new files.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_image(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` atomically; the format follows the suffix (PNG when there is none)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path
