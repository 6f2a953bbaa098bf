"""SELF: the single latent token sequence, its positions, and packing samples into batches.

One sample's image stream is ``[target tokens | ref 1 tokens | ... | ref K tokens]``. Each latent
(C, h, w) becomes (h/p · w/p) tokens of C·p·p values (p = 2 for Qwen-Image). Every token carries a
3-axis position ``(frame, row, col)``: ``frame`` is the image's index (target 0, reference i → i),
rows and columns are centred like diffusers' ``QwenEmbedRope(scale_rope=True)``: an axis of n tokens
gets positions ``-(n - n//2) … n//2 - 1``. Text tokens come after the largest image half-extent
(``max(h//2, w//2)``) with the same position on all three axes.

A batch of samples with different K and sizes is packed into rows (first-fit decreasing): each
row holds whole samples back to back, padded to a common capacity, and attention is restricted to
tokens of the same sample by a block-diagonal mask. With SELF every sample has about the same
length whatever K is, so rows fill almost completely (``real_fraction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

TARGET = 0
REFERENCE = 1
PAD = -1
# diffusers' QwenEmbedRope precomputes 4096 positions per axis; we compute on the fly but keep the
# same base so the rotary angles are identical.
ROPE_THETA = 10000


def patchify(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(C, h, w) latent -> (h/p · w/p, C·p·p) tokens, row-major, channels outermost (as diffusers)."""
    return rearrange(latent, "c (h ph) (w pw) -> (h w) (c ph pw)", ph=patch, pw=patch)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: (grid_h·grid_w, C·p·p) -> (C, grid_h·p, grid_w·p)."""
    return rearrange(tokens, "(h w) (c ph pw) -> c (h ph) (w pw)", h=grid_h, w=grid_w, ph=patch, pw=patch)


def centred_positions(n: int) -> torch.Tensor:
    """Positions of n tokens along one axis: ``-(n - n//2) … n//2 - 1`` (diffusers' scale_rope)."""
    return torch.arange(n) - (n - n // 2)


def image_position_ids(frame: int, grid_h: int, grid_w: int, centred: bool = True) -> torch.Tensor:
    """(grid_h·grid_w, 3) long positions (frame, row, col) of one image's tokens, row-major."""
    rows = centred_positions(grid_h) if centred else torch.arange(grid_h)
    cols = centred_positions(grid_w) if centred else torch.arange(grid_w)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    ff = torch.full_like(rr, frame)
    return torch.stack([ff, rr, cc], dim=-1).reshape(-1, 3)


def text_position_start(grids: Sequence[tuple[int, int]], centred: bool = True) -> int:
    """First text position: after the largest image half-extent (full extent if not centred)."""
    if centred:
        return max(max(h // 2, w // 2) for h, w in grids)
    return max(max(h, w) for h, w in grids)


def text_position_ids(length: int, start: int) -> torch.Tensor:
    """(length, 3) positions of text tokens: ``start + j`` on every axis."""
    pos = torch.arange(start, start + length)
    return pos[:, None].expand(length, 3).clone()


def rope_frequencies(position_ids: torch.Tensor, axes_dim: Sequence[int], theta: float = ROPE_THETA) -> torch.Tensor:
    """Complex rotary factors (L, sum(axes_dim)/2) for 3-axis positions (L, 3).

    Axis a with dim d_a uses angles ``pos_a · theta^(-2j/d_a)`` for j < d_a/2 (as ``QwenEmbedRope``).
    """
    parts = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = position_ids[:, axis].to(torch.float32)[:, None] * inv_freq[None, :]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


@dataclass
class SelfSequence:
    """One sample's SELF image stream: the noisy target first, then its K references."""

    tokens: torch.Tensor  # (L, C·p·p)
    position_ids: torch.Tensor  # (L, 3) long: frame, row, col
    token_type: torch.Tensor  # (L,) long: TARGET or REFERENCE
    grids: list[tuple[int, int]]  # (rows, cols) of tokens per image, target first
    patch: int

    @property
    def segment_lens(self) -> list[int]:
        return [h * w for h, w in self.grids]

    @property
    def num_target_tokens(self) -> int:
        return self.segment_lens[0]

    @property
    def num_refs(self) -> int:
        return len(self.grids) - 1

    @property
    def zero_timestep_mask(self) -> torch.Tensor:
        """(L,) bool: tokens modulated with timestep 0 under 2511's ``zero_cond_t`` (references)."""
        return self.token_type == REFERENCE

    def img_shapes(self) -> list[tuple[int, int, int]]:
        """diffusers' ``img_shapes`` for this sample: (frames, rows, cols) per image, target first."""
        return [(1, h, w) for h, w in self.grids]

    def target_latent(self, target_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Target tokens (these, or the given ones) back to a (C, h, w) latent."""
        tokens = self.tokens[: self.num_target_tokens] if target_tokens is None else target_tokens
        h, w = self.grids[0]
        return unpatchify(tokens, h, w, self.patch)

    def ref_latent(self, i: int) -> torch.Tensor:
        """Reference i (1-based, as its frame index) back to a (C, h, w) latent."""
        start = sum(self.segment_lens[:i])
        h, w = self.grids[i]
        return unpatchify(self.tokens[start : start + h * w], h, w, self.patch)


def build_sequence(
    target: torch.Tensor, refs: Sequence[torch.Tensor], patch: int = 2, centred: bool = True
) -> SelfSequence:
    """Serialize a target latent (C, h, w) and K reference latents (C, h_i, w_i) into one stream."""
    latents = [target, *refs]
    channels = target.shape[0]
    grids: list[tuple[int, int]] = []
    for i, lat in enumerate(latents):
        if lat.dim() != 3 or lat.shape[0] != channels:
            raise ValueError(f"latent {i} has shape {tuple(lat.shape)}; expected ({channels}, h, w)")
        if lat.shape[1] % patch or lat.shape[2] % patch:
            raise ValueError(f"latent {i} has spatial size {tuple(lat.shape[1:])}, not a multiple of {patch}")
        grids.append((lat.shape[1] // patch, lat.shape[2] // patch))
    tokens = torch.cat([patchify(lat, patch) for lat in latents])
    position_ids = torch.cat([image_position_ids(i, h, w, centred) for i, (h, w) in enumerate(grids)])
    token_type = torch.cat(
        [torch.full((h * w,), TARGET if i == 0 else REFERENCE, dtype=torch.long) for i, (h, w) in enumerate(grids)]
    )
    return SelfSequence(tokens, position_ids, token_type, grids, patch)


# --- packing ----------------------------------------------------------------------------------


def plan_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """Assign samples to rows, first-fit decreasing. ``capacity`` defaults to the longest sample.

    Returns the sample indices of each row, in the order they are laid out.
    """
    if not lengths:
        raise ValueError("cannot pack an empty batch")
    capacity = max(lengths) if capacity is None else capacity
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


@dataclass
class PackedStream:
    """Per-sample tensors (L_i, ...) laid out in rows (R, C, ...), padded with zeros."""

    values: torch.Tensor  # (R, C, ...)
    sample_ids: torch.Tensor  # (R, C) long, PAD where padding
    spans: list[tuple[int, int, int]]  # per sample: (row, start, length)

    @property
    def real_fraction(self) -> float:
        return float((self.sample_ids != PAD).float().mean())

    def unpack(self, values: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-sample slices of ``values`` (default: the packed values), in sample order."""
        values = self.values if values is None else values
        return [values[row, start : start + length] for row, start, length in self.spans]


def pack_stream(rows: Sequence[Sequence[int]], tensors: Sequence[torch.Tensor], pad_to: int = 1) -> PackedStream:
    """Lay ``tensors`` (sample i: (L_i, ...)) out in ``rows``; the row length is the longest row's,
    rounded up to ``pad_to``."""
    row_lens = [sum(tensors[i].shape[0] for i in row) for row in rows]
    capacity = -(-max(row_lens) // pad_to) * pad_to
    ref = tensors[0]
    values = ref.new_zeros((len(rows), capacity, *ref.shape[1:]))
    sample_ids = torch.full((len(rows), capacity), PAD, dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(tensors)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = tensors[i].shape[0]
            values[r, start : start + n] = tensors[i]
            sample_ids[r, start : start + n] = i
            spans[i] = (r, start, n)
            start += n
    return PackedStream(values, sample_ids, spans)


def attention_mask(*sample_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal boolean SDPA mask (R, 1, L, L) over the concatenation of the given streams'
    sample ids: a token attends only to tokens of its own sample. Padding attends to itself alone,
    so no row of the softmax is empty (that would give NaN)."""
    ids = torch.cat(sample_ids, dim=1)  # (R, L)
    same = ids[:, :, None] == ids[:, None, :]
    real = ids != PAD
    mask = same & real[:, :, None] & real[:, None, :]
    eye = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
    mask = mask | (eye & ~real[:, :, None])
    return mask[:, None]


@dataclass
class PackedBatch:
    """SELF sequences of several samples (different K and sizes) packed into rows."""

    sequences: list[SelfSequence]
    rows: list[list[int]]
    tokens: PackedStream  # values (R, C, D)
    position_ids: torch.Tensor  # (R, C, 3)
    token_type: torch.Tensor  # (R, C): TARGET, REFERENCE or PAD

    @property
    def real_fraction(self) -> float:
        return self.tokens.real_fraction

    @property
    def sample_ids(self) -> torch.Tensor:
        return self.tokens.sample_ids

    @property
    def target_mask(self) -> torch.Tensor:
        return self.token_type == TARGET

    def target_tokens(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's target tokens from packed per-token ``values`` (R, C, ...)."""
        return [
            values[row, start : start + seq.num_target_tokens]
            for seq, (row, start, _) in zip(self.sequences, self.tokens.spans, strict=True)
        ]

    def pack_like(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Lay out other per-token tensors (one (L_i, ...) per sample) exactly like the tokens."""
        return pack_stream(self.rows, tensors, pad_to=self.tokens.values.shape[1]).values


def pack_sequences(
    sequences: Sequence[SelfSequence],
    capacity: int | None = None,
    pad_to: int = 1,
    extra_lengths: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack SELF sequences into rows of at most ``capacity`` tokens.

    ``extra_lengths`` (e.g. each sample's text length) are added to the image lengths when
    assigning rows, so that a joint text+image row stays within the capacity too.
    """
    lengths = [s.tokens.shape[0] for s in sequences]
    fit_lens = lengths if extra_lengths is None else [a + b for a, b in zip(lengths, extra_lengths, strict=True)]
    rows = plan_rows(fit_lens, capacity)
    tokens = pack_stream(rows, [s.tokens for s in sequences], pad_to)
    positions = pack_stream(rows, [s.position_ids for s in sequences], pad_to).values
    types = pack_stream(rows, [s.token_type + 1 for s in sequences], pad_to).values - 1  # pads -> PAD
    return PackedBatch(list(sequences), rows, tokens, positions, types)
