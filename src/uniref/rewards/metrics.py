"""Exact per-reference metrics on the scene world, shared by MSGRPO rewards and ``uniref eval``.

For an output image and a sample's spec (see :mod:`uniref.data.tasks`) we compute:

* per target object ``j`` (everything in ``[0, 1]``, 1 = ground truth):
    - ``iou``: soft IoU of *colour membership* maps ``m(x) = clip(1 - |rgb(x) - c_j| / TAU, 0, 1)`` of output
      and target. The target's own map is the reference, so anti-aliasing, pattern marks and occlusion
      count identically on both sides and the ground truth scores exactly 1. Shape, size, pattern and
      position errors all lower it; a swapped colour or place drops it to ~0.
    - ``colour``: ``1 - |mean output rgb over the target's core pixels - c_j| / COLOUR_SCALE``.
    - ``placement``: ``exp(-d / r)``, ``d`` the distance between membership centroids, ``r`` the radius.
    - ``pattern``: ``1 - mean |w_out - w_tgt|`` over the object's silhouette, ``w`` = membership of the
      white pattern colour.
    - ``score = 0.4 iou + 0.25 colour + 0.25 placement + 0.1 pattern``.
* background: ``exp(-MAE / BG_MAE_SCALE)`` over pixels that no target object covers.
* per reference: the mean of the scores of what it contributes (``spec["refs"][i]["contributes"]``).
* instruction: the fraction of the instruction's checks (``spec["checks"]``) that pass.
* quality: mean SSIM of luminance against the target (7x7 box windows, Wang et al. 2004 constants);
  PSNR is reported in ``details`` too. SSIM over PSNR because it is bounded in [0, 1] and weighs
  structure (edges, patterns) rather than a colour offset spread over the whole image.

:class:`Scorer` precomputes everything that depends only on the sample, so RL can score G outputs of
one group cheaply. Outputs of any size are resized to the target size first.
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
COLOUR_SCALE = 2 * TAU  # a mean colour this far (or farther) from the target colour scores 0
BG_MAE_SCALE = 16.0  # background mean absolute error (0-255 levels) at which the score is 1/e
CORE = 0.9  # target membership above which a pixel is the object's own colour (no edge, no mark)
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

    def to_json(self) -> dict[str, Any]:
        return {
            "ref_scores": self.ref_scores,
            "worst_ref": self.worst_ref,
            "ref_consistency": self.ref_consistency,
            "instruction": self.instruction,
            "quality": self.quality,
            **self.details,
        }


def membership(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Soft membership (H, W) in [0, 1] of each pixel of ``img`` (H, W, 3; 0-255) in colour ``rgb``."""
    d = np.sqrt(((img - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=-1))
    return np.clip(1.0 - d / TAU, 0.0, 1.0)


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


def _as_array(img: Image.Image | np.ndarray, size: Size) -> np.ndarray:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (size.width, size.height):
        img = img.resize((size.width, size.height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32)


def _centroid(m: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[float, float] | None:
    total = float(m.sum())
    if total <= 0:
        return None
    return float((m.sum(axis=1) * ys).sum() / total), float((m.sum(axis=0) * xs).sum() / total)


@dataclass
class _ObjectRef:
    colour: tuple[int, int, int]
    member: np.ndarray  # target membership (H, W)
    core: np.ndarray  # bool (H, W)
    silhouette: np.ndarray  # bool (H, W)
    white: np.ndarray  # target pattern-colour membership on the silhouette (n_sil,)
    centroid: tuple[float, float] | None
    radius: float


class Scorer:
    """Scores outputs against one sample; construct once per sample, call once per output."""

    def __init__(self, sample: Sample) -> None:
        spec = sample.spec
        if not spec or "target" not in spec:
            raise ValueError("sample has no scene-world spec: exact metrics need spec['target'], ['refs'], ['checks']")
        self.spec = spec
        t = spec["target"]
        self.size = Size(width=int(t["width"]), height=int(t["height"]))
        scene = Scene.from_json(t["scene"])
        self.target = _as_array(sample.target, self.size)
        _, alphas = render_array(scene, self.size)
        self.ys = np.arange(self.size.height, dtype=np.float64)
        self.xs = np.arange(self.size.width, dtype=np.float64)
        # Coverage actually visible: what later objects paint over is not part of an earlier object.
        visible = [a * np.prod([1 - b for b in alphas[j + 1 :]], axis=0) for j, a in enumerate(alphas)]
        covered = np.max(np.stack(alphas), axis=0) if alphas else np.zeros(self.target.shape[:2], np.float32)
        self.bg_mask = covered < UNCOVERED
        self.objects = [self._object_ref(o, v) for o, v in zip(scene.objects, visible, strict=True)]
        self.target_luma = self.target @ LUMA

    def _object_ref(self, obj: SceneObject, visible: np.ndarray) -> _ObjectRef:
        colour = OBJECT_COLOURS[obj.colour]
        member = membership(self.target, colour)
        silhouette = visible > SILHOUETTE
        return _ObjectRef(
            colour=colour,
            member=member,
            core=(member > CORE) & silhouette,
            silhouette=silhouette,
            white=membership(self.target[silhouette], PATTERN_COLOUR),
            centroid=_centroid(member, self.ys, self.xs),
            radius=obj.radius_px(self.size),
        )

    def _object_score(self, ref: _ObjectRef, out: np.ndarray) -> ObjectScore:
        m = membership(out, ref.colour)
        union = float(np.maximum(m, ref.member).sum())
        iou = float(np.minimum(m, ref.member).sum()) / union if union > 0 else 0.0
        core = ref.core if ref.core.any() else ref.silhouette
        if core.any():
            mean = out[core].mean(axis=0)
            colour = max(0.0, 1.0 - float(np.linalg.norm(mean - np.asarray(ref.colour))) / COLOUR_SCALE)
        else:
            colour = 0.0
        c_out = _centroid(m, self.ys, self.xs)
        if c_out is None or ref.centroid is None:
            placement = 0.0
        else:
            d = math.hypot(c_out[0] - ref.centroid[0], c_out[1] - ref.centroid[1])
            placement = math.exp(-d / max(ref.radius, 1.0))
        if ref.silhouette.any():
            pattern = 1.0 - float(np.abs(membership(out[ref.silhouette], PATTERN_COLOUR) - ref.white).mean())
        else:
            pattern = 0.0
        return ObjectScore(iou=iou, colour=colour, placement=placement, pattern=pattern)

    def _background_score(self, out: np.ndarray) -> float:
        if not self.bg_mask.any():
            return 1.0
        mae = float(np.abs(out[self.bg_mask] - self.target[self.bg_mask]).mean())
        return math.exp(-mae / BG_MAE_SCALE)

    def _absent(self, obj: SceneObject, out: np.ndarray) -> bool:
        rows, cols, alpha, _ = render_object(obj, self.size)
        sil = alpha > SILHOUETTE
        if not sil.any():
            return True
        colour = OBJECT_COLOURS[obj.colour]
        got = float(membership(out[rows, cols][sil], colour).mean())
        expected = float(membership(self.target[rows, cols][sil], colour).mean())
        return got <= expected + ABSENT_MARGIN

    def __call__(self, output: Image.Image | np.ndarray) -> SampleScore:
        out = _as_array(output, self.size)
        objs = [self._object_score(r, out) for r in self.objects]
        bg = self._background_score(out)
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
                passed.append(self._absent(SceneObject(**check["obj"]), out))
            else:
                raise ValueError(f"unknown check kind {kind!r} in spec")
        quality = ssim(out @ LUMA, self.target_luma)
        return SampleScore(
            ref_scores=ref_scores,
            instruction=float(np.mean(passed)) if passed else 1.0,
            quality=float(np.clip(quality, 0.0, 1.0)),
            details={
                "objects": [o.score for o in objs],
                "background": bg,
                "psnr": psnr(out, self.target),
                "checks_passed": int(sum(passed)),
                "checks": len(passed),
            },
        )


def score(output: Image.Image | np.ndarray, sample: Sample) -> SampleScore:
    """Score one output against ``sample`` (for many outputs of one sample, build a :class:`Scorer`)."""
    return Scorer(sample)(output)
