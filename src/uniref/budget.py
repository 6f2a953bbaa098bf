"""Budget planning: the only place where UniRef decides image sizes.

Three modes plan the sizes of K reference images:

* ``global`` (SELF, the default): all references share one pixel budget ``B``. Each gets an area
  share proportional to ``weight_i * w_i * h_i`` (so with equal weights every image is scaled by the
  same factor, as in the paper and UniPic-3), and its size is searched among multiples of
  ``multiple`` near the ideal one, trading aspect error against area error. A global scale is then
  bisected so that the sum fits, and the slack is filled greedily. Guarantees: ``sum(W*H) <= B``
  always (hard cap), every side >= ``multiple``, and a :class:`BudgetError` naming K, the budget and
  the smallest budget that fits when K images cannot fit even at ``multiple x multiple``.
* ``per_image``: diffusers' ``QwenImageEditPlusPipeline`` behaviour: every image gets the whole
  budget to itself (``calculate_dimensions``: ``w = sqrt(B*a)``, ``h = w/a``, each rounded to
  ``multiple`` with Python's ``round``). Tokens grow linearly with K.
* ``global_round``: UniPic-3's joint rule: ``r = sqrt(B / sum(w*h))``, every side scaled by ``r``
  and rounded to ``multiple``. Rounding can overshoot the budget and can collapse a small image.

The target (output) size is planned separately, with its own budget (:func:`plan_target`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from uniref.errors import BudgetError

# Qwen-Image: a VAE with 8x downsampling and 2x2 patches, so one DiT token covers 16x16 pixels.
QWEN_TOKEN_PIXELS = 16
# Sides are rounded to 32 px by diffusers' and UniPic-3's Qwen-Image-Edit pipelines.
QWEN_MULTIPLE = 32
# How far (in multiples) from the ideal side length the candidate search looks.
_SEARCH_RADIUS = 2
# Relative weight of area error against aspect error when choosing among candidate sizes.
_AREA_ERROR_WEIGHT = 0.5
_BISECT_ITERS = 60


class Size(NamedTuple):
    """An image size in pixels. Always name the fields: ``Size(width=..., height=...)``."""

    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class PlanMode(str, Enum):
    GLOBAL = "global"
    PER_IMAGE = "per_image"
    GLOBAL_ROUND = "global_round"


@dataclass(frozen=True)
class Plan:
    """The planned sizes of K images under one budget."""

    mode: PlanMode
    budget_pixels: int
    multiple: int
    originals: tuple[Size, ...]
    sizes: tuple[Size, ...]

    @property
    def total_pixels(self) -> int:
        return sum(s.area for s in self.sizes)

    @property
    def budget_use(self) -> float:
        """Planned pixels over the budget; above 1.0 only for ``per_image`` and ``global_round``."""
        return self.total_pixels / self.budget_pixels

    def tokens(self, token_pixels: int = QWEN_TOKEN_PIXELS) -> list[int]:
        """DiT tokens per image for a model whose token covers ``token_pixels``² pixels."""
        return [s.area // (token_pixels * token_pixels) for s in self.sizes]

    def aspect_errors(self) -> list[float]:
        """Relative aspect error per image: ``|(W/H) / (w/h) - 1|``."""
        return [abs(p.aspect / o.aspect - 1.0) for p, o in zip(self.sizes, self.originals, strict=True)]


def parse_budget(value: int | str) -> int:
    """A budget given as a side length (``1024`` means 1024x1024 pixels) or as ``WxH``."""
    text = str(value).strip().lower()
    try:
        if "x" in text:
            w, h = text.split("x", 1)
            pixels = int(w) * int(h)
        else:
            pixels = int(text) ** 2
    except ValueError:
        raise BudgetError(f"budget {value!r}: expected a side length like 1024 or a size like 1024x768") from None
    if pixels <= 0:
        raise BudgetError(f"budget {value!r}: must be positive")
    return pixels


def plan(
    sizes: Sequence[Size],
    budget: int,
    multiple: int = QWEN_MULTIPLE,
    mode: PlanMode | str = PlanMode.GLOBAL,
    *,
    weights: Sequence[float] | None = None,
    max_upscale: float | None = None,
) -> Plan:
    """Plan the sizes of K images under ``budget`` pixels (see the module docstring for the modes).

    ``weights`` (global mode) scale each image's area share; ``max_upscale`` (global mode) caps
    how much any image may be enlarged (1.0 = never upscale), at the cost of budget use.
    """
    mode = PlanMode(mode)
    originals = tuple(Size(int(s.width), int(s.height)) for s in sizes)
    _check_inputs(originals, budget, multiple, weights)
    if mode is PlanMode.PER_IMAGE:
        planned = [_per_image_size(s, budget, multiple) for s in originals]
    elif mode is PlanMode.GLOBAL_ROUND:
        planned = _global_round_sizes(originals, budget, multiple)
    else:
        planned = _global_sizes(originals, budget, multiple, weights, max_upscale)
    return Plan(mode, budget, multiple, originals, tuple(planned))


def joint_budget(budget: int, k: int, floor: int = 0) -> int:
    """The pixel budget ``k`` references share when each is owed at least ``floor`` pixels: the larger
    of ``budget`` and ``k · floor`` (``floor`` 0: SELF's flat budget)."""
    return max(budget, k * floor)


def plan_target(
    budget: int,
    multiple: int,
    *,
    size: Size | None = None,
    like: Size | None = None,
    mode: PlanMode | str = PlanMode.GLOBAL,
) -> Size:
    """The output size: an explicit ``size`` rounded down to ``multiple``, or, from the aspect of
    ``like`` (usually a reference), the best size under ``budget`` (never above it). With
    ``mode="per_image"`` a size from ``like`` is diffusers' ``calculate_dimensions`` (may exceed
    the budget by the rounding)."""
    if size is not None:
        if size.width < multiple or size.height < multiple:
            raise BudgetError(f"output size {size}: each side must be at least {multiple} px")
        return Size(size.width // multiple * multiple, size.height // multiple * multiple)
    if like is None:
        side = max(multiple, math.isqrt(budget) // multiple * multiple)
        return Size(side, side)
    if PlanMode(mode) is PlanMode.PER_IMAGE:
        return _per_image_size(like, budget, multiple)
    return plan([like], budget, multiple, PlanMode.GLOBAL).sizes[0]


def min_budget_side(k: int, multiple: int) -> int:
    """The smallest square budget side (as given to ``--budget``) that holds k images at minimum size."""
    return math.ceil(math.sqrt(k * multiple * multiple))


# --- modes ------------------------------------------------------------------------------------


def _check_inputs(originals: tuple[Size, ...], budget: int, multiple: int, weights: Sequence[float] | None) -> None:
    if not originals:
        raise BudgetError("no images to plan: give at least one reference (K = 0)")
    if multiple <= 0:
        raise BudgetError(f"multiple {multiple}: must be a positive number of pixels")
    if budget <= 0:
        raise BudgetError(f"budget {budget} pixels: must be positive")
    for i, s in enumerate(originals):
        if s.width <= 0 or s.height <= 0:
            raise BudgetError(f"image {i + 1} has size {s}: both sides must be positive")
    if weights is not None:
        if len(weights) != len(originals):
            raise BudgetError(f"{len(weights)} weights given for {len(originals)} images")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise BudgetError(f"weights {list(weights)}: each must be a positive number")


def _per_image_size(original: Size, budget: int, multiple: int) -> Size:
    # diffusers' calculate_dimensions, generalised from 32 to `multiple`.
    ratio = original.width / original.height
    width = math.sqrt(budget * ratio)
    height = width / ratio
    planned = Size(round(width / multiple) * multiple, round(height / multiple) * multiple)
    if planned.width == 0 or planned.height == 0:
        raise BudgetError(
            f"image of size {original}: per_image planning rounds a side to 0 "
            f"(aspect {ratio:.3g} is too extreme for budget {budget} px at multiple {multiple})"
        )
    return planned


def _global_round_sizes(originals: tuple[Size, ...], budget: int, multiple: int) -> list[Size]:
    # UniPic-3's rule, kept exactly so benchmarks can show its overshoot and collapse; sides that
    # round to 0 are reported as the collapse they are, not silently fixed.
    ratio = math.sqrt(budget / sum(s.area for s in originals))
    planned = [
        Size(round(s.width * ratio / multiple) * multiple, round(s.height * ratio / multiple) * multiple)
        for s in originals
    ]
    collapsed = [i + 1 for i, s in enumerate(planned) if s.width == 0 or s.height == 0]
    if collapsed:
        raise BudgetError(
            f"global_round collapses image(s) {collapsed} to a side of 0 at budget {budget} px; use --mode global"
        )
    return planned


def _global_sizes(
    originals: tuple[Size, ...],
    budget: int,
    multiple: int,
    weights: Sequence[float] | None,
    max_upscale: float | None,
) -> list[Size]:
    k = len(originals)
    if k * multiple * multiple > budget:
        raise BudgetError(
            f"{k} images cannot fit in a budget of {budget} px ({_side_text(budget)}) even at "
            f"{multiple}x{multiple} each; the smallest budget that fits is "
            f"{k * multiple * multiple} px (--budget {min_budget_side(k, multiple)})"
        )
    weights = list(weights) if weights is not None else [1.0] * k
    weighted = [w * s.area for w, s in zip(weights, originals, strict=True)]
    shares = [x / sum(weighted) for x in weighted]
    # Caps on each image's area: its own upscale limit (if any) and the whole budget.
    caps = [
        min(float(budget), s.area * max_upscale**2) if max_upscale is not None else float(budget) for s in originals
    ]

    def sizes_at(scale: float) -> list[Size]:
        return [
            _best_size(s, min(scale * share * budget, cap), multiple)
            for s, share, cap in zip(originals, shares, caps, strict=True)
        ]

    # Bisect the largest global scale whose planned sizes fit; sum of areas is monotone enough in
    # scale for bisection to land within one candidate step of the best fit.
    lo, hi = 0.0, 4.0
    while sum(s.area for s in sizes_at(hi)) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(_BISECT_ITERS):
        mid = (lo + hi) / 2
        before = (lo, hi)
        if sum(s.area for s in sizes_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
        if (lo, hi) == before:  # floats ran out between lo and hi: every further step repeats this one
            break
    planned = sizes_at(lo)
    if sum(s.area for s in planned) > budget:  # scale 0 gives minimum sizes, which fit (checked above)
        planned = [Size(multiple, multiple)] * k
    return _fill_slack(planned, originals, budget, multiple, caps)


def _best_size(original: Size, target_area: float, multiple: int) -> Size:
    """The candidate size (sides multiples of ``multiple``, >= ``multiple``) closest to
    ``target_area`` with ``original``'s aspect, by aspect error plus weighted area error."""
    # Plain floats rather than Size objects in the loop: the global planner calls this ~70 times per
    # image and plan, inside every training step.
    target_area = max(target_area, 1.0)
    aspect = original.width / original.height
    ideal_w = math.sqrt(target_area * aspect) / multiple
    ideal_h = math.sqrt(target_area / aspect) / multiple
    heights = [hi * multiple for hi in _near(ideal_h)]
    best_cost, best_w, best_h = math.inf, 0, 0
    for wi in _near(ideal_w):
        w = wi * multiple
        for h in heights:
            cost = abs(math.log(w / h / aspect)) + _AREA_ERROR_WEIGHT * abs(math.log(w * h / target_area))
            if cost < best_cost:
                best_cost, best_w, best_h = cost, w, h
    return Size(best_w, best_h)


def _near(ideal: float) -> range:
    centre = math.floor(ideal)
    return range(max(1, centre - _SEARCH_RADIUS + 1), max(1, centre + _SEARCH_RADIUS) + 1)


def _fill_slack(
    planned: list[Size], originals: tuple[Size, ...], budget: int, multiple: int, caps: list[float]
) -> list[Size]:
    """Greedily grow images while the budget allows. A growth moves one image to a larger size of
    its aspect ladder (one or both sides up) whose aspect error stays within a quarter rounding step;
    the growth that loses least aspect per pixel gained goes first."""
    planned = list(planned)
    used = sum(s.area for s in planned)
    while True:
        best: tuple[float, int, Size] | None = None
        for i, (cur, orig) in enumerate(zip(planned, originals, strict=True)):
            cur_err = _aspect_err(cur, orig)
            for cand in _growths(cur, orig, multiple):
                gain = cand.area - cur.area
                if used + gain > budget or cand.area > caps[i]:
                    continue
                err = _aspect_err(cand, orig)
                if err > max(cur_err, _aspect_tolerance(cand, multiple)):
                    continue
                score = (err - cur_err) / gain
                if best is None or score < best[0]:
                    best = (score, i, cand)
        if best is None:
            return planned
        _, i, cand = best
        used += cand.area - planned[i].area
        planned[i] = cand


def _growths(cur: Size, orig: Size, multiple: int) -> list[Size]:
    """Sizes one step up from ``cur``: one side up one multiple, or both up to the next size on the
    aspect ladder (the other side re-rounded for the aspect)."""
    up_w, up_h = cur.width + multiple, cur.height + multiple
    cands = [Size(up_w, cur.height), Size(cur.width, up_h)]
    for w in (up_w, up_w + multiple):
        h = max(multiple, round(w / orig.aspect / multiple) * multiple)
        cands.append(Size(w, max(h, cur.height)))
    for h in (up_h, up_h + multiple):
        w = max(multiple, round(h * orig.aspect / multiple) * multiple)
        cands.append(Size(max(w, cur.width), h))
    return [c for c in dict.fromkeys(cands) if c.area > cur.area]


def _aspect_err(size: Size, orig: Size) -> float:
    return abs(math.log(size.aspect / orig.aspect))


def _aspect_tolerance(size: Size, multiple: int) -> float:
    # A quarter of the aspect error one rounding step on the shorter side can cause: loose enough
    # to fill the budget with many small images, tight enough that no image visibly stretches.
    return math.log1p(multiple / (4 * min(size.width, size.height)))


def _side_text(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} px"
