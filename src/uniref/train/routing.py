"""Routing supervision: where a target object's tokens should look among the references.

The diagnostics (``uniref edit --explain``) showed why the tiny model loses identity in compositions:
the tokens of an object placed at a slot read the background picture as much as the rest of the
output does, instead of fetching the object from its own reference. The scene world knows exactly
where every placed object sits in the target and in the reference it comes from, so the attention
that does this can be taught directly, as DreamO's routing constraint and MOSAIC's correspondence
loss do for real subjects:

    for a target token t inside object j, whose source is object o of reference i,
    p_h(t) = Σ_{keys in o} A_h[t, ·] / Σ_{keys in any reference} A_h[t, ·]     (head h of a block)
    L_route = −log( mean_h p_h(t) + ε ), averaged over such tokens and over blocks 1..depth−1

The ratio is taken within the reference tokens only: the token stays free to read the instruction
and the output; of what it reads from the references, it should read the right object. Taking the
mean over heads before the log lets a few heads do the fetching while others do other work. The
first block is left out: before it has read the instruction a token cannot know which picture
fills its slot.

With three or more references the tiny model also loses which picture gives the background, so
background routes (``loss.route_background``) ask the same of the target tokens no object covers:
of what they read from the references, they should read the background picture (all its tokens,
since the question is which picture, not where in it). Each kind is averaged on its own and the two
means are added, so the many background tokens do not drown the few object tokens; a sample gives
at most :data:`BACKGROUND_QUERIES` background queries, evenly spread, which is enough to say which
picture and keeps the term cheap.

Besides the routes, :func:`object_token_mask` marks the target tokens that any object covers, so the
flow-matching loss can weigh them up (``loss.object_weight``): objects are a few percent of the
tokens of a scene and the plain per-token mean spends the model's capacity on the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uniref.budget import Size
from uniref.data.scenes import SceneObject
from uniref.sequence import PackedBatch

ROUTE_EPS = 1e-6
BACKGROUND_QUERIES = 32


@dataclass(frozen=True)
class Route:
    """Target tokens of one placed object and the tokens of its source object in reference ``ref``
    (0-based), both as row-major indices into their own token grids."""

    target_tokens: torch.Tensor  # (n,) long
    ref: int
    ref_tokens: torch.Tensor  # (m,) long
    background: bool = False  # a background route (the whole background picture) rather than an object's


def _disc_tokens(cx: float, cy: float, rx: float, ry: float, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens of a (h, w) grid whose centre lies in the ellipse of normalised centre (cx, cy) and
    radii (rx, ry); the token under the centre when the object is smaller than a token."""
    h, w = grid
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    inside = ((u[None, :] - cx) / max(rx, 1e-6)) ** 2 + ((v[:, None] - cy) / max(ry, 1e-6)) ** 2 <= 1.0
    if not inside.any():
        row, col = min(h - 1, max(0, int(cy * h))), min(w - 1, max(0, int(cx * w)))
        inside[row, col] = True
    return torch.nonzero(inside.flatten())[:, 0]


def _object_tokens(obj: dict[str, Any], canvas: Size, grid: tuple[int, int]) -> torch.Tensor:
    o = SceneObject(**obj)
    r = o.radius_px(canvas)
    return _disc_tokens(o.cx, o.cy, r / canvas.width, r / canvas.height, grid)


def _source_object(ref_objects: Sequence[dict[str, Any]], placed: dict[str, Any]) -> dict[str, Any] | None:
    """The object of a reference scene that a placed target object was copied from: the one of the same
    shape (references never hold two of one shape beside a placed object), the same colour breaking ties."""
    same_shape = [o for o in ref_objects if o["shape"] == placed["shape"]]
    if len(same_shape) > 1:
        same_shape = [o for o in same_shape if o["colour"] == placed["colour"]]
    return same_shape[0] if len(same_shape) == 1 else None


def sample_routes(spec: dict[str, Any], grids: Sequence[tuple[int, int]], background: bool = False) -> list[Route]:
    """Routes of one scene sample, for the token grids of its target (``grids[0]``) and references.
    Objects a reference contributes whole (``"what": "object"``) are routed; colour and pattern donors
    and specs without a scene (real data) give no route. With ``background`` and two or more
    references, up to :data:`BACKGROUND_QUERIES` target tokens outside every object are routed to
    the picture that contributes the background."""
    try:
        target = spec["target"]
        canvas = Size(width=int(target["width"]), height=int(target["height"]))
        placed = target["scene"]["objects"]
        refs = spec["refs"]
    except (KeyError, TypeError):
        return []
    routes = []
    for i, ref in enumerate(refs):
        ref_canvas = Size(width=int(ref["width"]), height=int(ref["height"]))
        for part in ref.get("contributes", []):
            if part.get("what") != "object" or i + 1 >= len(grids):
                continue
            obj = placed[part["object"]]
            source = _source_object(ref["scene"]["objects"], obj)
            if source is None:
                continue
            routes.append(
                Route(_object_tokens(obj, canvas, grids[0]), i, _object_tokens(source, ref_canvas, grids[i + 1]))
            )
        if background and len(refs) > 1 and any(p.get("what") == "background" for p in ref.get("contributes", [])):
            route = _background_route(spec, grids, i)
            if route is not None:
                routes.append(route)
    return routes


def _background_route(spec: dict[str, Any], grids: Sequence[tuple[int, int]], ref: int) -> Route | None:
    if ref + 1 >= len(grids):
        return None
    covered = object_token_mask(spec, grids[0])
    free = torch.nonzero(~covered)[:, 0] if covered is not None else torch.zeros(0, dtype=torch.long)
    if len(free) == 0:
        return None
    picks = torch.linspace(0, len(free) - 1, min(BACKGROUND_QUERIES, len(free))).round().long()
    h, w = grids[ref + 1]
    return Route(free[picks], ref, torch.arange(h * w), background=True)


def object_token_mask(spec: dict[str, Any], grid: tuple[int, int]) -> torch.Tensor | None:
    """(h·w,) bool: the target tokens that some target object covers; None without a scene spec."""
    try:
        target = spec["target"]
        canvas = Size(width=int(target["width"]), height=int(target["height"]))
        placed = target["scene"]["objects"]
    except (KeyError, TypeError):
        return None
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    for obj in placed:
        mask[_object_tokens(obj, canvas, grid)] = True
    return mask


@dataclass
class PackedRoutes:
    """Routes laid out like a packed joint sequence (text first, then image tokens, per row).

    ``queries`` (R, N) are positions of routed target tokens in their row (``valid`` marks the real
    ones, ``background`` those of background routes); ``good`` (R, N, L) marks each query's source
    keys, ``refs`` (R, N, L) all reference keys of its sample."""

    queries: torch.Tensor
    valid: torch.Tensor
    good: torch.Tensor
    refs: torch.Tensor
    background: torch.Tensor | None = None

    def to(self, device: torch.device) -> PackedRoutes:
        moved = (self.queries, self.valid, self.good, self.refs, self.background)
        return PackedRoutes(*(None if t is None else t.to(device) for t in moved))


def pack_routes(
    routes: Sequence[Sequence[Route]],
    spans: Sequence[tuple[int, int, int]],
    grids: Sequence[Sequence[tuple[int, int]]],
    text_len: int,
    row_len: int,
    rows: int,
) -> PackedRoutes | None:
    """Lay each sample's routes out in the rows of a packed batch whose image tokens of sample j start
    at ``spans[j]`` (row, start, length) after ``text_len`` text positions; None when nothing is routed."""
    per_row: list[list[tuple[int, torch.Tensor, torch.Tensor, bool]]] = [[] for _ in range(rows)]
    for sample_routes_, (row, start, _), sample_grids in zip(routes, spans, grids, strict=True):
        sizes = [h * w for h, w in sample_grids]
        offsets = [start + sum(sizes[:i]) for i in range(len(sizes))]
        ref_keys = torch.zeros(row_len, dtype=torch.bool)
        ref_keys[text_len + offsets[1] : text_len + start + sum(sizes)] = True
        for route in sample_routes_:
            good = torch.zeros(row_len, dtype=torch.bool)
            good[text_len + offsets[route.ref + 1] + route.ref_tokens] = True
            for q in (text_len + offsets[0] + route.target_tokens).tolist():
                per_row[row].append((q, good, ref_keys, route.background))
    n = max(len(r) for r in per_row)
    if n == 0:
        return None
    queries = torch.zeros(rows, n, dtype=torch.long)
    valid = torch.zeros(rows, n, dtype=torch.bool)
    good = torch.zeros(rows, n, row_len, dtype=torch.bool)
    refs = torch.zeros(rows, n, row_len, dtype=torch.bool)
    background = torch.zeros(rows, n, dtype=torch.bool)
    for r, items in enumerate(per_row):
        for j, (q, g, k, bg) in enumerate(items):
            queries[r, j], valid[r, j], good[r, j], refs[r, j], background[r, j] = q, True, g, k, bg
    return PackedRoutes(queries, valid, good, refs, background)


class RoutingLoss:
    """An attention hook (``model.attention_hook``) that adds one :func:`routing_loss` term per block
    it sees for a packed batch; the text length is read off the block's sequence length."""

    def __init__(self, routes: Sequence[Sequence[Route]], batch: PackedBatch) -> None:
        self.routes, self.batch = routes, batch
        self.packed: PackedRoutes | None = None
        self.terms: list[torch.Tensor] = []
        self.empty = not any(routes)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
        if self.empty:
            return
        if self.packed is None:
            spans, grids = self.batch.tokens.spans, [seq.grids for seq in self.batch.sequences]
            text_len = q.shape[2] - self.batch.tokens.values.shape[1]
            packed = pack_routes(self.routes, spans, grids, text_len, q.shape[2], q.shape[0])
            assert packed is not None
            self.packed = packed.to(q.device)
        self.terms.append(routing_loss(q, k, mask, self.packed))

    @property
    def loss(self) -> torch.Tensor | None:
        return torch.stack(self.terms).mean() if self.terms else None


def routing_loss(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, routes: PackedRoutes) -> torch.Tensor:
    """−log of the share of reference attention that routed queries give their source object.

    ``q``, ``k`` (R, H, L, Dh) after RoPE, ``mask`` (R, 1, L, L) the block-diagonal attention mask;
    the softmax is the one the block's attention computes, for the routed queries only."""
    index = routes.queries[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
    logits = q.gather(2, index) @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (R, H, N, L)
    allowed = mask[:, 0].gather(1, routes.queries[..., None].expand(-1, -1, mask.shape[-1]))  # (R, N, L)
    probs = logits.float().masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    good = (probs * routes.good[:, None]).sum(-1)
    ref = (probs * routes.refs[:, None]).sum(-1)
    share = (good / ref.clamp_min(1e-12)).mean(1)  # (R, N): mean over heads
    nll = -torch.log(share + ROUTE_EPS)
    background = routes.background if routes.background is not None else torch.zeros_like(routes.valid)
    kinds = [routes.valid & ~background, routes.valid & background]
    return torch.stack([nll[kind].mean() for kind in kinds if kind.any()]).sum()
