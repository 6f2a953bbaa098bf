"""Exact per-reference metrics on the scene world, shared by MSGRPO rewards and ``uniref eval``.

For an output image and a sample's spec (see :mod:`uniref.data.tasks`) we compute:

* per target object ``j`` (everything in ``[0, 1]``, 1 = ground truth):
    - ``iou``: soft IoU of *colour membership* maps of output and target (see "membership" below). The
      target's own map is the reference, so anti-aliasing, pattern marks and occlusion count identically
      on both sides and the ground truth scores exactly 1. Shape, size, pattern and position errors all
      lower it; a swapped colour or place drops it to ~0.
    - ``colour``: ``1 - |mean output rgb - mean target rgb| / COLOUR_SCALE`` over the object's core pixels
      (where the sharp target shows the object's own colour: no edge, no mark).
    - ``placement``: ``exp(-d / r) * min(1, M_out / M_tgt)``, ``d`` the distance between membership
      centroids, ``r`` the radius, ``M`` the total membership (a few stray pixels have a centroid too).
    - ``pattern``: ``1 - mean |w_out - w_tgt|`` over the object's silhouette, ``w`` = the fraction of the
      white pattern colour in a pixel.
    - ``score = 0.4 iou + 0.25 colour + 0.25 placement + 0.1 pattern``.
* background: ``exp(-MAE / BG_MAE_SCALE)`` over pixels that no target object covers.
* per reference: the mean of the scores of what it contributes (``spec["refs"][i]["contributes"]``).
* instruction: the fraction of the instruction's checks (``spec["checks"]``) that pass.
* quality: mean SSIM of luminance against the sharp target (7x7 box windows, Wang et al. 2004
  constants); PSNR is reported in ``details`` too. SSIM over PSNR because it is bounded in [0, 1] and
  weighs structure (edges, patterns) rather than a colour offset spread over the whole image.

**Tolerance of honest resampling.** A generated image is always somewhat soft: it is decoded from a
latent, often at a lower resolution than the target, and resized. Two rules keep a faithful but soft
output near 1 on the consistency scores, while quality (SSIM at full resolution) still pays for softness:

1. *Compare at a common resolution.* Output and target are both blurred with the same Gaussian of
   ``sigma = ANALYSIS_SIGMA * max(1, target side / output side)`` before the object and background
   scores, so detail finer than what either image can carry counts on neither side. An output smaller
   than the target (the pipeline planned it under a smaller budget) is judged at its own resolution.
2. *Membership that reads mixes with the pattern colour.* Plain membership
   ``m(x) = clip(1 - |rgb(x) - c_j| / TAU, 0, 1)`` reads a pixel that is half object colour and half
   white stripe as 0, so a blurred striped object "vanishes". Inside a patterned object's footprint we
   therefore also read a pixel as a mix ``a c_j + (1 - a) white`` and count its object fraction ``a``
   (and its pattern fraction ``1 - a``) when it lies within ``TAU_MIX`` of that line. The fraction is
   linear in the pixel, so blurring moves membership around without losing it. Restricting it to the
   footprint of patterned objects matters: muted background blends (sand-taupe) lie within ~6 RGB
   units of the brown-white line, so a global mix term would find a brown object everywhere.

:class:`Scorer` precomputes everything that depends only on the sample (per analysis resolution), so
RL can score G outputs of one group cheaply. Outputs of any size are resized to the target size first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from uniref.budget import Size
from uniref.data.sample import Sample
from uniref.data.scenes import OBJECT_COLOURS, PATTERN_COLOUR, Scene, SceneObject, render_array, render_object

TAU = 45.0  # RGB radius of soft colour membership: under half the minimum palette separation (~95)
# RGB distance from the object-white mixing line within which a pixel counts as a mix. A linear resample
# of two colours stays on their line up to rounding and clipped ringing (a few units); the nearest muted
# background blend to any such line inside a footprint is ~6 units off the brown one, and the mix term
# only applies inside patterned objects' footprints.
TAU_MIX = 20.0
UNMIX_RIDGE = 1.0  # (RGB units)^4 added to the 2x2 unmixing determinant: no division by zero
COLOUR_SCALE = 2 * TAU  # a mean colour this far (or farther) from the target's scores 0
BG_MAE_SCALE = 16.0  # background mean absolute error (0-255 levels) at which the score is 1/e
# Analysis blur (pixels at the target resolution): about the blur of one Lanczos x0.5 down-and-up
# resample, the softest output we still call faithful at full resolution.
ANALYSIS_SIGMA = 1.25
BLUR_TRUNCATE = 3.0  # Gaussian kernel radius in sigmas
MIN_COLOUR_MASS = 1.0  # object fraction (pixels) below which an object shows no colour of its own
SILHOUETTE = 0.5  # coverage above which a pixel belongs to an object's silhouette
UNCOVERED = 1e-3  # coverage below which a pixel is pure background
WEIGHTS = {"iou": 0.4, "colour": 0.25, "placement": 0.25, "pattern": 0.1}
# Pass thresholds of the instruction checks.
IOU_FOUND = 0.5  # concentric 1x vs 1.5x circles have IoU 0.44: a wrong size fails
COLOUR_OK = 0.5
PATTERN_OK = 0.75  # solid where stripes are expected scores ~0.5
BACKGROUND_OK = 0.5  # MAE <= ~11 levels
ABSENT_MARGIN = 0.2  # a removed object may keep this much more membership than the target has
SSIM_WINDOW = 7
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_WHITE = np.asarray(PATTERN_COLOUR, dtype=np.float32)


def headline_score(instruction: float, worst_ref: float) -> float:
    """``√(instruction · worst_ref)``: OmniContext's √(PF·SC) with the worst reference as subject
    consistency, so that neither ignoring the instruction (returning a reference) nor dropping one
    reference can score well; the ground truth scores 1."""
    return math.sqrt(max(0.0, instruction) * max(0.0, worst_ref))


@dataclass(frozen=True)
class ObjectScore:
    iou: float
    colour: float
    placement: float
    pattern: float

    @property
    def score(self) -> float:
        return sum(w * getattr(self, k) for k, w in WEIGHTS.items())


@dataclass
class SampleScore:
    """Per-source scores of one output, all in [0, 1]."""

    ref_scores: list[float]  # one per reference, in picture order
    instruction: float  # fraction of the instruction's checks that pass
    quality: float  # SSIM against the target
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def worst_ref(self) -> float:
        return min(self.ref_scores)

    @property
    def ref_consistency(self) -> float:
        return float(np.mean(self.ref_scores))

    @property
    def overall(self) -> float:
        """The headline score (:func:`headline_score`)."""
        return headline_score(self.instruction, self.worst_ref)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref_scores": self.ref_scores,
            "overall": self.overall,
            "worst_ref": self.worst_ref,
            "ref_consistency": self.ref_consistency,
            "instruction": self.instruction,
            "quality": self.quality,
            **self.details,
        }


def membership(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Plain soft membership (...) in [0, 1] of each pixel of ``img`` (..., 3; 0-255) in colour ``rgb``."""
    d = np.sqrt(((img - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=-1))
    return np.clip(1.0 - d / TAU, 0.0, 1.0)


def unmix(img: np.ndarray, rgb: tuple[int, int, int], under: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read each pixel (..., 3) as ``a rgb + b white + (1 - a - b) under`` (``under``: what the target shows
    there without the object). Returns the object fraction ``a`` and pattern fraction ``b``, each faded to
    0 as the pixel lies farther than TAU_MIX from that plane of mixes. Least squares per pixel."""
    u = under.astype(np.float32)
    d_obj = np.asarray(rgb, dtype=np.float32) - u  # (..., 3)
    d_white = _WHITE - u
    d = img - u
    g11, g22, g12 = (d_obj * d_obj).sum(-1), (d_white * d_white).sum(-1), (d_obj * d_white).sum(-1)
    r1, r2 = (d_obj * d).sum(-1), (d_white * d).sum(-1)
    det = g11 * g22 - g12 * g12 + UNMIX_RIDGE
    a = np.clip((g22 * r1 - g12 * r2) / det, 0.0, 1.0)
    b = np.clip((g11 * r2 - g12 * r1) / det, 0.0, 1.0 - a)
    off = np.sqrt(((d - a[..., None] * d_obj - b[..., None] * d_white) ** 2).sum(-1))
    on_plane = np.clip(1.0 - off / TAU_MIX, 0.0, 1.0)
    return a * on_plane, b * on_plane


def object_membership(
    img: np.ndarray, rgb: tuple[int, int, int], zone: np.ndarray | None = None, under: np.ndarray | None = None
) -> np.ndarray:
    """Membership (H, W) in colour ``rgb``; inside ``zone`` (the object's blurred footprint) a mix of the
    object colour, white marks and the underlay ``under`` (H, W, 3) counts by its object fraction."""
    m = membership(img, rgb)
    if zone is not None and under is not None:
        m[zone] = np.maximum(m[zone], unmix(img[zone], rgb, under[zone])[0])
    return m


def pattern_fraction(pixels: np.ndarray, rgb: tuple[int, int, int], under: np.ndarray) -> np.ndarray:
    """Fraction of the white pattern colour in pixels (N, 3) of an object of colour ``rgb`` over ``under``."""
    return np.maximum(membership(pixels, PATTERN_COLOUR), unmix(pixels, rgb, under)[1])


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W[, C]) over H and W, edges replicated (sigma <= 0: unchanged)."""
    if sigma <= 0:
        return img
    radius = max(1, math.ceil(BLUR_TRUNCATE * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = img.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.moveaxis(np.pad(out, pad, mode="edge"), axis, 0)
        acc = sum(float(k) * padded[i : i + n] for i, k in enumerate(kernel))
        out = np.moveaxis(acc, 0, axis).astype(np.float32)
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, via shifted ORs."""
    if radius <= 0:
        return mask
    out = np.zeros_like(mask)
    h, w = mask.shape
    p = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows (valid positions only), via 2-D cumulative sums."""
    c = np.cumsum(np.cumsum(np.pad(a, ((1, 0), (1, 0))), axis=0), axis=1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two luminance images (0-255), box windows of SSIM_WINDOW (smaller images: one window)."""
    k = min(SSIM_WINDOW, *a.shape)
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = _box_mean(a, k), _box_mean(b, k)
    var_a = _box_mean(a * a, k) - mu_a**2
    var_b = _box_mean(b * b, k) - mu_b**2
    cov = _box_mean(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _as_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    return img.convert("RGB")


def _as_array(img: Image.Image | np.ndarray, size: Size) -> np.ndarray:
    img = _as_image(img)
    if img.size != (size.width, size.height):
        img = img.resize((size.width, size.height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32)


def analysis_sigma(target: Size, output: tuple[int, int]) -> float:
    """Blur (target pixels) of the common resolution at which an output of ``output`` (w, h) is judged."""
    scale = math.sqrt(target.width * target.height / max(1, output[0] * output[1]))
    return ANALYSIS_SIGMA * max(1.0, scale)


def _centroid(m: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[float, float] | None:
    total = float(m.sum())
    if total <= 0:
        return None
    return float((m.sum(axis=1) * ys).sum() / total), float((m.sum(axis=0) * xs).sum() / total)


@dataclass
class _ObjectRef:
    """What one target object looks like at one analysis resolution."""

    colour: tuple[int, int, int]
    zone: np.ndarray  # bool (H, W): the blurred footprint, where mixes with white and underlay count
    under: np.ndarray  # (H, W, 3) the blurred target without this object
    member: np.ndarray  # target membership (H, W)
    weight: np.ndarray  # (H, W) the object's blurred coverage: where its colour is read
    weight_rgb: np.ndarray  # (3,) coverage-weighted sum of target colour
    colour_mass: float  # coverage-weighted sum of the target's object fraction
    silhouette: np.ndarray  # bool (H, W)
    white: np.ndarray  # target pattern fraction on the silhouette (n_sil,)
    under_sil: np.ndarray  # (n_sil, 3) the underlay on the silhouette
    centroid: tuple[float, float] | None
    mass: float  # total target membership
    radius: float


@dataclass
class _View:
    """The target seen at one analysis resolution (blur ``sigma``)."""

    sigma: float
    target: np.ndarray  # blurred target (H, W, 3)
    objects: list[_ObjectRef]


class Scorer:
    """Scores outputs against one sample; construct once per sample, call once per output."""

    def __init__(self, sample: Sample) -> None:
        spec = sample.spec
        if not spec or "target" not in spec:
            raise ValueError("sample has no scene-world spec: exact metrics need spec['target'], ['refs'], ['checks']")
        self.spec = spec
        t = spec["target"]
        self.size = Size(width=int(t["width"]), height=int(t["height"]))
        self.scene = Scene.from_json(t["scene"])
        self.target = _as_array(sample.target, self.size)
        _, alphas = render_array(self.scene, self.size)
        self.ys = np.arange(self.size.height, dtype=np.float64)
        self.xs = np.arange(self.size.width, dtype=np.float64)
        # Coverage actually visible: what later objects paint over is not part of an earlier object.
        self.visible = [a * np.prod([1 - b for b in alphas[j + 1 :]], axis=0) for j, a in enumerate(alphas)]
        covered = np.max(np.stack(alphas), axis=0) if alphas else np.zeros(self.target.shape[:2], np.float32)
        self.bg_mask = covered < UNCOVERED
        self.target_luma = self.target @ LUMA
        self._views: dict[float, _View] = {}

    def view(self, sigma: float) -> _View:
        """The target at analysis blur ``sigma`` (cached: a group of RL outputs shares one)."""
        if sigma not in self._views:
            target = gaussian_blur(self.target, sigma)
            objects = [self._object_ref(j, target, sigma) for j in range(len(self.scene.objects))]
            self._views[sigma] = _View(sigma=sigma, target=target, objects=objects)
        return self._views[sigma]

    def _object_ref(self, j: int, target: np.ndarray, sigma: float) -> _ObjectRef:
        obj, visible = self.scene.objects[j], self.visible[j]
        colour = OBJECT_COLOURS[obj.colour]
        silhouette = visible > SILHOUETTE
        # The blur spreads an object over ~BLUR_TRUNCATE sigma beyond its sharp outline.
        zone = _dilate(visible > UNCOVERED, math.ceil(BLUR_TRUNCATE * sigma))
        without = Scene(self.scene.background, self.scene.objects[:j] + self.scene.objects[j + 1 :])
        under = gaussian_blur(render_array(without, self.size)[0] * 255.0, sigma)
        member = object_membership(target, colour, zone, under)
        weight = gaussian_blur(visible, sigma)
        frac = np.zeros_like(weight)
        frac[zone] = unmix(target[zone], colour, under[zone])[0]
        return _ObjectRef(
            colour=colour,
            zone=zone,
            under=under,
            member=member,
            weight=weight,
            weight_rgb=(weight[..., None] * target).sum(axis=(0, 1)),
            colour_mass=float((weight * frac).sum()),
            silhouette=silhouette,
            white=pattern_fraction(target[silhouette], colour, under[silhouette]),
            under_sil=under[silhouette],
            centroid=_centroid(member, self.ys, self.xs),
            mass=float(member.sum()),
            radius=obj.radius_px(self.size),
        )

    def _object_score(self, ref: _ObjectRef, out: np.ndarray) -> ObjectScore:
        m = object_membership(out, ref.colour, ref.zone, ref.under)
        union = float(np.maximum(m, ref.member).sum())
        iou = float(np.minimum(m, ref.member).sum()) / union if union > 0 else 0.0
        if ref.colour_mass >= MIN_COLOUR_MASS:
            # Both images are mixes of object colour, white and underlay in the same proportions if the
            # object is right, so the coverage-weighted colour difference per unit of object is the
            # object's colour error; blur moves colour between neighbouring pixels without changing it.
            diff = (ref.weight[..., None] * out).sum(axis=(0, 1)) - ref.weight_rgb
            colour = max(0.0, 1.0 - float(np.linalg.norm(diff)) / ref.colour_mass / COLOUR_SCALE)
        else:  # fully covered by later objects: nothing of its own colour to compare
            colour = 0.0
        c_out = _centroid(m, self.ys, self.xs)
        if c_out is None or ref.centroid is None:
            placement = 0.0
        else:
            d = math.hypot(c_out[0] - ref.centroid[0], c_out[1] - ref.centroid[1])
            # A centroid of a few stray pixels says nothing about where the object is: weigh by found mass.
            found = min(1.0, float(m.sum()) / ref.mass)
            placement = math.exp(-d / max(ref.radius, 1.0)) * found
        if ref.silhouette.any():
            got = pattern_fraction(out[ref.silhouette], ref.colour, ref.under_sil)
            pattern = 1.0 - float(np.abs(got - ref.white).mean())
        else:
            pattern = 0.0
        return ObjectScore(iou=iou, colour=colour, placement=placement, pattern=pattern)

    def _background_score(self, out: np.ndarray, target: np.ndarray) -> float:
        if not self.bg_mask.any():
            return 1.0
        mae = float(np.abs(out[self.bg_mask] - target[self.bg_mask]).mean())
        return math.exp(-mae / BG_MAE_SCALE)

    def background_like(self, output: Image.Image | np.ndarray, scene: Scene) -> float:
        """The background score of ``output`` against ``scene``'s background instead of the target's (same
        pixels, blur and scale): which picture's background did an output take?"""
        _, out, view = self._analyse(output)
        other = gaussian_blur(render_array(Scene(scene.background, ()), self.size)[0] * 255.0, view.sigma)
        return self._background_score(out, other)

    def _absent(self, obj: SceneObject, out: np.ndarray, target: np.ndarray) -> bool:
        rows, cols, alpha, _ = render_object(obj, self.size)
        sil = alpha > SILHOUETTE
        if not sil.any():
            return True
        colour = OBJECT_COLOURS[obj.colour]
        # A patterned object left in place is half white marks: read mixes of its colour, white and
        # what the target shows there, or a copied striped object would pass as removed.
        under = target[rows, cols][sil]
        got_px = out[rows, cols][sil]
        got = float(np.maximum(membership(got_px, colour), unmix(got_px, colour, under)[0]).mean())
        expected = float(membership(under, colour).mean())
        return got <= expected + ABSENT_MARGIN

    def _analyse(self, output: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, _View]:
        """(output at the target size, the same at the analysis blur, the target's view at that blur)."""
        img = _as_image(output)
        view = self.view(analysis_sigma(self.size, img.size))
        sharp = _as_array(img, self.size)
        return sharp, gaussian_blur(sharp, view.sigma), view

    def parts(self, output: Image.Image | np.ndarray) -> tuple[list[ObjectScore], float]:
        """The score parts of every target object, and the background score (what ``__call__`` combines)."""
        _, out, view = self._analyse(output)
        return [self._object_score(r, out) for r in view.objects], self._background_score(out, view.target)

    def __call__(self, output: Image.Image | np.ndarray) -> SampleScore:
        sharp, out, view = self._analyse(output)
        objs = [self._object_score(r, out) for r in view.objects]
        bg = self._background_score(out, view.target)
        ref_scores = []
        for ref in self.spec["refs"]:
            parts = []
            for c in ref["contributes"]:
                what = c["what"]
                if what == "background":
                    parts.append(bg)
                elif what == "object":
                    parts.append(objs[c["object"]].score)
                else:  # a colour or pattern donated to an object
                    parts.append(getattr(objs[c["object"]], what))
            ref_scores.append(float(np.mean(parts)) if parts else 1.0)
        passed = []
        for check in self.spec["checks"]:
            kind = check["kind"]
            if kind == "object":
                o = objs[check["object"]]
                passed.append(o.iou >= IOU_FOUND and o.colour >= COLOUR_OK)
            elif kind == "colour":
                passed.append(objs[check["object"]].colour >= COLOUR_OK)
            elif kind == "pattern":
                passed.append(objs[check["object"]].pattern >= PATTERN_OK)
            elif kind == "background":
                passed.append(bg >= BACKGROUND_OK)
            elif kind == "absent":
                passed.append(self._absent(SceneObject(**check["obj"]), out, view.target))
            else:
                raise ValueError(f"unknown check kind {kind!r} in spec")
        quality = ssim(sharp @ LUMA, self.target_luma)
        return SampleScore(
            ref_scores=ref_scores,
            instruction=float(np.mean(passed)) if passed else 1.0,
            quality=float(np.clip(quality, 0.0, 1.0)),
            details={
                "objects": [o.score for o in objs],
                "background": bg,
                "psnr": psnr(sharp, self.target),
                "analysis_sigma": view.sigma,
                "checks_passed": int(sum(passed)),
                "checks": len(passed),
            },
        )


def score(output: Image.Image | np.ndarray, sample: Sample) -> SampleScore:
    """Score one output against ``sample`` (for many outputs of one sample, build a :class:`Scorer`)."""
    return Scorer(sample)(output)
