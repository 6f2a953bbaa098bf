"""The scene world: objects on backgrounds, rendered anti-aliased at any size and aspect.

A :class:`Scene` is a background plus objects, all in *normalised* coordinates: an object's centre
``(cx, cy)`` is a fraction of the canvas width and height, and its ``size`` (diameter) is a fraction of
the canvas' short side, so shapes keep their aspect on any canvas and a scene renders the same picture
at 64x40 and at 640x400 (up to resolution). Rendering supersamples every pixel
(:data:`SUPERSAMPLE` x :data:`SUPERSAMPLE` samples) and averages, which anti-aliases edges and patterns.

Identity of an object = shape x colour x pattern (8 x 9 x 4). Colours come from a named palette whose
entries are at least ~100 RGB units apart (tested), so a colour names one object unambiguously;
pattern marks are white, a colour no object or background uses. Rotation is kept within
+-:data:`MAX_ROTATION` degrees so that a square never becomes a diamond, nor a plus an "x".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from uniref.budget import Size

# Object colours: saturated, >= 95 RGB units from each other, from white and from every background colour.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 125, 0),
    "yellow": (235, 225, 35),
    "green": (30, 150, 50),
    "cyan": (20, 195, 215),
    "blue": (35, 70, 215),
    "purple": (135, 45, 185),
    "pink": (240, 110, 190),
    "brown": (115, 65, 25),
}
# Background colours: muted, so that blends between two of them (gradients, textures) stay muted too.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (125, 125, 125),
    "sand": (205, 190, 150),
    "slate": (80, 95, 115),
    "sage": (150, 170, 135),
    "taupe": (150, 130, 120),
    "navy": (40, 45, 80),
}
# Pattern marks (stripes, dots, checks) are drawn in this colour on top of the object colour.
PATTERN_COLOUR = (255, 255, 255)

SHAPES = ("circle", "square", "triangle", "star", "plus", "ring", "diamond", "hexagon")
PATTERNS = ("solid", "striped", "dotted", "checked")
BACKGROUND_KINDS = ("gradient", "grid", "texture")
GRADIENT_DIRECTIONS = ("horizontal", "vertical", "diagonal")

SUPERSAMPLE = 4  # samples per pixel side: 16 samples/pixel; 4 is where edge error drops below 1/32 levels
MAX_ROTATION = 20.0  # degrees; beyond ~22.5 a square reads as a diamond
# Pattern geometry in units of the object radius, so a pattern scales with its object (and blurs when
# the object is small: the "details survive only at a large budget" property of DESIGN.md §4).
PATTERN_PERIOD = 0.5
DOT_RADIUS = 0.15
RING_INNER = 0.55  # inner radius of a ring, as a fraction of its outer radius
PLUS_ARM = 0.34  # half-width of a plus-sign arm
STAR_INNER = 0.45  # inner radius of the 5-point star
SQUARE_HALF = 0.8  # half-side of a square, so its area is close to a circle of radius 1
GRID_CELLS = (3, 8)  # grid cells across the short side, inclusive range
GRID_LINE = 0.08  # grid line width as a fraction of a cell
TEXTURE_CELLS = 6  # coarse noise lattice across the short side of a texture
TEXTURE_LATTICE = 64  # lattice points per axis: aspects up to ~10 before the noise repeats


@dataclass(frozen=True)
class SceneObject:
    """One object. ``cx, cy`` in [0, 1] of width/height; ``size`` = diameter / short side; degrees."""

    shape: str
    colour: str
    pattern: str
    cx: float
    cy: float
    size: float
    rotation: float = 0.0

    def describe(self) -> str:
        """'red striped star' (the solid pattern is not spoken)."""
        words = [self.colour] + ([] if self.pattern == "solid" else [self.pattern]) + [self.shape]
        return " ".join(words)

    def radius_px(self, canvas: Size) -> float:
        return self.size * min(canvas.width, canvas.height) / 2.0

    def bbox(self, canvas: Size) -> tuple[float, float, float, float]:
        """Normalised (x0, y0, x1, y1) of the circle that bounds the shape on ``canvas``."""
        r = self.radius_px(canvas)
        rx, ry = r / canvas.width, r / canvas.height
        return (self.cx - rx, self.cy - ry, self.cx + rx, self.cy + ry)

    def replace(self, **changes: Any) -> SceneObject:
        return SceneObject(**{**asdict(self), **changes})


@dataclass(frozen=True)
class Background:
    """``kind`` in BACKGROUND_KINDS; two palette colours; ``param``: direction index, cells, or noise seed."""

    kind: str
    colours: tuple[str, str]
    param: int = 0

    def describe(self) -> str:
        a, b = self.colours
        if self.kind == "gradient":
            return f"a {GRADIENT_DIRECTIONS[self.param]} gradient from {a} to {b}"
        if self.kind == "grid":
            return f"a {a} grid of {self.param} cells with {b} lines"
        return f"a {a} and {b} texture"


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        bg = asdict(self.background)
        bg["colours"] = list(bg["colours"])
        return {"background": bg, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        bg = data["background"]
        return cls(
            background=Background(kind=bg["kind"], colours=tuple(bg["colours"]), param=int(bg["param"])),
            objects=tuple(SceneObject(**o) for o in data["objects"]),
        )


# --- shapes: membership tests in object-local coordinates (unit = radius) ------------------------


def _regular_polygon(n: int, phase: float, radius: float = 1.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_polygon() -> np.ndarray:
    outer = _regular_polygon(5, -math.pi / 2)
    inner = _regular_polygon(5, -math.pi / 2 + math.pi / 5, STAR_INNER)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _plus_polygon() -> np.ndarray:
    a, b = PLUS_ARM, 0.95
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                     (-a, -a)])  # fmt: skip


_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array(
        [
            (-SQUARE_HALF, -SQUARE_HALF),
            (SQUARE_HALF, -SQUARE_HALF),
            (SQUARE_HALF, SQUARE_HALF),
            (-SQUARE_HALF, SQUARE_HALF),
        ]
    ),  # fmt: skip
    "triangle": _regular_polygon(3, -math.pi / 2) + np.array([0.0, 0.2]),  # centred on its bbox, not centroid
    "star": _star_polygon(),
    "plus": _plus_polygon(),
    "diamond": _regular_polygon(4, -math.pi / 2),
    "hexagon": _regular_polygon(6, 0.0),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points; ``verts`` (N, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        crosses = (y1 > v) != (y0 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean membership of local points (u, v) (unit = object radius, y down) in ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= RING_INNER**2)
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the white pattern marks are, in the same local coordinates."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        return np.mod(u / PATTERN_PERIOD, 1.0) < 0.5
    if pattern == "dotted":
        du = np.mod(u, PATTERN_PERIOD) - PATTERN_PERIOD / 2
        dv = np.mod(v, PATTERN_PERIOD) - PATTERN_PERIOD / 2
        return du * du + dv * dv <= DOT_RADIUS**2
    if pattern == "checked":
        return (np.floor(u / PATTERN_PERIOD) + np.floor(v / PATTERN_PERIOD)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


# --- rendering -------------------------------------------------------------------------------------


def _sample_grid(n: int, start: float, ss: int) -> np.ndarray:
    """Sub-pixel sample coordinates for pixels start..start+n-1: shape (n*ss,)."""
    return start + (np.arange(n * ss) + 0.5) / ss


def _block_mean(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


MIN_RADIUS_PX = 1e-6  # objects smaller than this render as nothing


def render_object(obj: SceneObject, canvas: Size, ss: int = SUPERSAMPLE) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Coverage and colour of one object on ``canvas``, restricted to its pixel bbox.

    Returns (row slice, column slice, alpha (h, w), premultiplied rgb (h, w, 3)) in [0, 1].
    """
    r = obj.radius_px(canvas)
    px, py = obj.cx * canvas.width, obj.cy * canvas.height
    x0, x1 = max(0, math.floor(px - r)), min(canvas.width, math.ceil(px + r))
    y0, y1 = max(0, math.floor(py - r)), min(canvas.height, math.ceil(py + r))
    # A radius far below a pixel covers nothing; dividing by it would overflow to inf and NaN.
    if x1 <= x0 or y1 <= y0 or r < MIN_RADIUS_PX:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0)), np.zeros((0, 0, 3))
    xs = (_sample_grid(x1 - x0, x0, ss) - px) / r
    ys = (_sample_grid(y1 - y0, y0, ss) - py) / r
    xx, yy = np.meshgrid(xs, ys)
    theta = math.radians(obj.rotation)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    inside = shape_mask(obj.shape, u, v)
    marks = pattern_mask(obj.pattern, u, v) & inside
    base = np.asarray(OBJECT_COLOURS[obj.colour], dtype=np.float32) / 255.0
    mark = np.asarray(PATTERN_COLOUR, dtype=np.float32) / 255.0
    rgb = inside[..., None] * base + marks[..., None] * (mark - base)
    return slice(y0, y1), slice(x0, x1), _block_mean(inside.astype(np.float32), ss), _block_mean(rgb, ss)


def _texture_noise(seed: int, canvas: Size) -> np.ndarray:
    """Smooth value noise in [0, 1], defined on a lattice fixed relative to the short side."""
    lattice = np.random.default_rng(seed).random((TEXTURE_LATTICE, TEXTURE_LATTICE))
    short = min(canvas.width, canvas.height)
    gx = (np.arange(canvas.width) + 0.5) / short * TEXTURE_CELLS
    gy = (np.arange(canvas.height) + 0.5) / short * TEXTURE_CELLS
    ix, iy = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - ix, gy - iy
    ix, iy = ix % (TEXTURE_LATTICE - 1), iy % (TEXTURE_LATTICE - 1)  # wrap: extreme aspects tile the noise
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: no lattice creases
    a, b = lattice[np.ix_(iy, ix)], lattice[np.ix_(iy, ix + 1)]
    c, d = lattice[np.ix_(iy + 1, ix)], lattice[np.ix_(iy + 1, ix + 1)]
    top = a + (b - a) * fx[None, :]
    bottom = c + (d - c) * fx[None, :]
    return top + (bottom - top) * fy[:, None]


def render_background(bg: Background, canvas: Size, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Background as float32 (H, W, 3) in [0, 1]."""
    a = np.asarray(BACKGROUND_COLOURS[bg.colours[0]], dtype=np.float32) / 255.0
    b = np.asarray(BACKGROUND_COLOURS[bg.colours[1]], dtype=np.float32) / 255.0
    w, h = canvas.width, canvas.height
    if bg.kind == "gradient":
        x = (np.arange(w, dtype=np.float32) + 0.5) / w
        y = (np.arange(h, dtype=np.float32) + 0.5) / h
        direction = GRADIENT_DIRECTIONS[bg.param]
        t = {
            "horizontal": np.broadcast_to(x[None, :], (h, w)),
            "vertical": np.broadcast_to(y[:, None], (h, w)),
            "diagonal": (x[None, :] + y[:, None]) / 2,
        }[direction]
    elif bg.kind == "grid":
        cell = min(w, h) / bg.param
        xs = np.mod(_sample_grid(w, 0, ss) / cell, 1.0)
        ys = np.mod(_sample_grid(h, 0, ss) / cell, 1.0)
        line_x = (xs < GRID_LINE / 2) | (xs > 1 - GRID_LINE / 2)
        line_y = (ys < GRID_LINE / 2) | (ys > 1 - GRID_LINE / 2)
        t = _block_mean((line_y[:, None] | line_x[None, :]).astype(np.float32), ss)
    elif bg.kind == "texture":
        t = _texture_noise(bg.param, canvas).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}; expected one of {BACKGROUND_KINDS}")
    return a + t[..., None] * (b - a)


def render_array(scene: Scene, canvas: Size, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, list[np.ndarray]]:
    """Float (H, W, 3) image in [0, 1] and each object's full-canvas coverage (H, W), in paint order."""
    img = render_background(scene.background, canvas, ss).copy()
    alphas = []
    for obj in scene.objects:
        rows, cols, alpha, rgb = render_object(obj, canvas, ss)
        full = np.zeros((canvas.height, canvas.width), dtype=np.float32)
        full[rows, cols] = alpha
        img[rows, cols] = img[rows, cols] * (1 - alpha[..., None]) + rgb
        alphas.append(full)
    return img, alphas


def to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def render(scene: Scene, canvas: Size, ss: int = SUPERSAMPLE) -> Image.Image:
    """Render ``scene`` as an RGB image of ``canvas`` size."""
    return to_image(render_array(scene, canvas, ss)[0])
