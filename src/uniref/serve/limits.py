"""What a request may ask of the server, and how every bad input becomes one 4xx JSON body.

Every check here raises :class:`HTTPInputError` with the HTTP status, the form field (``param``), the
uploaded file's name when there is one, and a one-line message in the words of the CLI: an image is
read by :func:`uniref.images.load_image` itself, so an upload gets exactly the message ``uniref edit``
prints for the same file, with the temporary path replaced by ``image #i 'name.png'``. The body is
OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) so the official client
raises its usual ``BadRequestError`` with our message, plus ``file`` when a file is at fault.
"""

from __future__ import annotations

import hmac
import io
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from uniref.budget import PlanMode, Size, parse_budget
from uniref.errors import ImageInputError, UniRefError
from uniref.images import load_image

MIB = 1024 * 1024
# A request may ask for at most this many times the model's native pixel budgets (references and
# output): beyond it one request costs as much as a whole batch of ordinary ones.
MAX_BUDGET_FACTOR = 4


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Caps on one request; the defaults suit a model served to a few people on a workstation."""

    max_refs: int = 8  # reference images per request (SELF packs any K; this bounds one request's cost)
    max_upload_bytes: int = 20 * MIB  # one uploaded file (a 24 MP PNG photo is about 20 MB)
    max_request_bytes: int = 64 * MIB  # the whole multipart body
    max_pixels: int = 40_000_000  # one decoded image (a 40 MP camera frame; bombs are far larger)
    max_prompt_chars: int = 2000  # instruction length (Qwen-Image-Edit's encoder sees ~1k tokens)
    max_n: int = 4  # images per request (``n``)
    max_steps: int = 100  # denoising steps per request
    max_guidance: float = 20.0  # true-CFG scale (Qwen's examples use 4)
    max_noise_level: float = 2.0  # the SDE sampler's noise level (Flow-GRPO samples at about 0.7)

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class HTTPInputError(UniRefError):
    """A request the server refuses: HTTP ``status``, the form ``param`` at fault, optionally ``file``."""

    def __init__(
        self, status: int, param: str | None, message: str, *, file: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.file = file
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.param, file=self.file, code=self.code, status=self.status)


def error_body(
    message: str, param: str | None = None, *, file: str | None = None, code: str | None = None, status: int = 400
) -> dict[str, Any]:
    """OpenAI's error JSON (``type`` as OpenAI names it for the status), plus ``file`` when known."""
    kind = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}.get(status)
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if file is not None:
        error["file"] = file
    return {"error": error}


def check_api_key(header: str | None, api_key: str | None) -> None:
    """``Authorization: Bearer KEY`` against the server's key, in constant time (401 otherwise)."""
    if api_key is None:
        return
    scheme, _, given = (header or "").partition(" ")
    # compare_digest takes the same time wherever the strings differ, so timing does not leak the key.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise HTTPInputError(
            401, "Authorization", "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
        )


# --- uploads ----------------------------------------------------------------------------------------


@dataclass
class Upload:
    """One uploaded file as received: its form field, client-side name and bytes."""

    field: str
    filename: str
    data: bytes


def upload_name(filename: str | None, index: int) -> str:
    """The client's file name without any folders (never used as a path), or ``image<i>``."""
    name = PurePath((filename or "").replace("\\", "/")).name
    return name or f"image{index}"


def label(index: int, name: str) -> str:
    """How messages name the ``index``-th (1-based: it is picture ``index``) uploaded image."""
    return f"image #{index} {name!r}"


def read_images(uploads: list[Upload], limits: Limits) -> list[Image.Image]:
    """Decode K uploads into RGB images, or raise the first problem as an :class:`HTTPInputError`."""
    if not uploads:
        raise HTTPInputError(400, "image", "no reference images given (K = 0): send at least one 'image' file")
    if len(uploads) > limits.max_refs:
        raise HTTPInputError(
            400, "image", f"{len(uploads)} reference images; this server takes at most {limits.max_refs} per request"
        )
    with tempfile.TemporaryDirectory(prefix="uniref-serve-") as tmp:
        return [read_image(u, i, limits, Path(tmp)) for i, u in enumerate(uploads, start=1)]


def read_image(upload: Upload, index: int, limits: Limits, folder: Path) -> Image.Image:
    """One upload through the CLI's own reader (see the module docstring), after the byte and pixel caps."""
    name, where = upload.filename, label(index, upload.filename)
    if len(upload.data) > limits.max_upload_bytes:
        raise HTTPInputError(
            413,
            upload.field,
            f"{where}: {len(upload.data):,} bytes, more than the {limits.max_upload_bytes:,} bytes allowed per file",
            file=name,
        )
    _check_pixels(upload, where, limits)
    path = folder / f"{index}{PurePath(name).suffix[:16]}"
    path.write_bytes(upload.data)
    try:
        return load_image(path)
    except ImageInputError as exc:
        message = str(exc).replace(str(path), where)
        status = 413 if "decompression bomb" in message else 400
        raise HTTPInputError(status, upload.field, message, file=name) from None


def _check_pixels(upload: Upload, where: str, limits: Limits) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` before anything is decoded."""
    try:
        with Image.open(io.BytesIO(upload.data)) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        width, height = -1, -1  # larger than PIL's own hard limit
    except Exception:
        return  # not readable as an image: load_image reports why, in the CLI's words
    if width < 0 or width * height > limits.max_pixels:
        size = "more than PIL's limit of" if width < 0 else f"{width}x{height} = {width * height:,} pixels,"
        raise HTTPInputError(
            413,
            upload.field,
            f"{where}: {size} more than the {limits.max_pixels:,} allowed per image; "
            "refusing a possible decompression bomb",
            file=upload.filename,
        )


# --- form fields ------------------------------------------------------------------------------------


def text_field(form: dict[str, str], name: str, limits: Limits, *, required: bool) -> str | None:
    value = form.get(name)
    if value is None or not value.strip():
        if required:
            raise HTTPInputError(400, name, f"{name}: missing or empty; say what to do, e.g. 'make the cup red'")
        return None
    if len(value) > limits.max_prompt_chars:
        raise HTTPInputError(
            400, name, f"{name}: {len(value):,} characters; this server takes at most {limits.max_prompt_chars:,}"
        )
    return value


def int_field(form: dict[str, str], name: str, lo: int, hi: int | None = None) -> int | None:
    value = form.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise HTTPInputError(400, name, f"{name} {value!r}: expected a whole number") from None
    if number < lo or (hi is not None and number > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise HTTPInputError(400, name, f"{name} {number}: must be {bound}")
    return number


def float_field(form: dict[str, str], name: str, lo: float, hi: float) -> float | None:
    value = form.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value.strip())
    except ValueError:
        raise HTTPInputError(400, name, f"{name} {value!r}: expected a number") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise HTTPInputError(400, name, f"{name} {value!r}: must be from {lo:g} to {hi:g}")
    return number


def bool_field(form: dict[str, str], name: str) -> bool:
    value = (form.get(name) or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise HTTPInputError(400, name, f"{name} {value!r}: expected true or false")


def mode_field(form: dict[str, str], name: str, *, allow_round: bool) -> PlanMode:
    value = (form.get(name) or PlanMode.GLOBAL.value).strip()
    allowed = [m.value for m in PlanMode if allow_round or m is not PlanMode.GLOBAL_ROUND]
    if value not in allowed:
        raise HTTPInputError(400, name, f"{name} {value!r}: choose one of {', '.join(allowed)}")
    return PlanMode(value)


def budget_field(form: dict[str, str], name: str, native: int) -> int | None:
    """A budget (``1024`` = 1024², or ``WxH``) in pixels, at most ``MAX_BUDGET_FACTOR`` times the native one."""
    value = form.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        pixels = parse_budget(value)
    except UniRefError as exc:
        raise HTTPInputError(400, name, str(exc)) from None
    if pixels > MAX_BUDGET_FACTOR * native:
        raise HTTPInputError(
            400,
            name,
            f"{name} {value!r}: {pixels:,} pixels; this model's native budget is {native:,} and the server "
            f"allows up to {MAX_BUDGET_FACTOR}x that",
        )
    return pixels


def budget_arg(pixels: int | None) -> int | str | None:
    """``pixels`` as the pipeline's ``budget`` argument, which reads an int as a side length."""
    if pixels is None:
        return None
    side = math.isqrt(pixels)
    return side if side * side == pixels else f"{pixels}x1"


def size_field(form: dict[str, str], name: str, native: int) -> Size | None:
    """The output size: ``WxH`` (OpenAI's form), or ``auto`` / absent for the last reference's aspect."""
    value = (form.get(name) or "auto").strip()
    if value.lower() == "auto":
        return None
    match = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", value)
    if not match or int(match[1]) <= 0 or int(match[2]) <= 0:
        raise HTTPInputError(400, name, f"{name} {value!r}: expected WIDTHxHEIGHT, e.g. 512x384, or auto")
    size = Size(int(match[1]), int(match[2]))
    if size.area > MAX_BUDGET_FACTOR * native:
        raise HTTPInputError(
            400,
            name,
            f"{name} {value!r}: {size.area:,} pixels; this model's native output is {native:,} pixels and the "
            f"server allows up to {MAX_BUDGET_FACTOR}x that",
        )
    return size
