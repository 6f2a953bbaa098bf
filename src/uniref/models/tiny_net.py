"""The tiny flavour's network: a word encoder and dual-stream joint-attention blocks (MMDiT).

* **Text**: a word-level encoder (a few transformer layers) over the scene grammar's vocabulary; with
  binding, each reference's pooled latent tokens follow its "picture i" label in the encoder's input.
* **Denoiser**: dual-stream joint-attention blocks (separate text/image weights, one attention over
  both, adaLN modulation, QK-RMSNorm), 3-axis RoPE on (frame, row, col) exactly as the SELF sequence
  defines it, plus an image-index embedding and Fourier features of per-image normalised coordinates
  (DESIGN §7: these make placement and background transfer easy). Reference tokens are modulated with
  timestep 0 (2511's ``zero_cond_t``): they are clean. The output is x̂_0.

:mod:`uniref.models.tiny` wraps it behind the adapter protocol (tokenizer, codec, packing, saving).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from uniref.sequence import PAD, REFERENCE, attention_mask, rope_frequencies

if TYPE_CHECKING:
    from uniref.models.tiny import TinyConfig

# Timesteps are embedded as σ·1000, the scale diffusers' Qwen-Image transformer uses.
TIMESTEP_SCALE = 1000.0
PAD_ID = 0  # the word id of padding (the tokenizer's first special word)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (R, H, L, D) by rotation: complex (R, L, D/2), or its real view
    (R, L, D/2, 2) = (cos, sin). Compiled blocks take the real form, since inductor generates no code
    for complex tensors; eager takes the complex one, about 8x faster on CPU than the product written
    out (fwd + bwd)."""
    if rotation.is_complex():
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rotation[:, None]).flatten(-2).type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    cos, sin = rotation[:, None].unbind(-1)
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


class Stream(nn.Module):
    """One modality's weights inside a joint block. ``with_output=False`` (the text stream of the
    last block) keeps only what produces keys and values: its output would never be read, and
    unused weights break DDP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, with_output: bool = True) -> None:
        super().__init__()
        head_dim = width // heads
        self.modulation = nn.Linear(width, (6 if with_output else 2) * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.with_output = with_output
        if with_output:
            self.out = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.heads = heads
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def qkv_heads(self, x: torch.Tensor, mod: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        shift, scale = mod[0], mod[1]
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(-3)  # each (R, L, H, Dh)
        return self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod: Sequence[torch.Tensor]) -> torch.Tensor:
        gate1, shift2, scale2, gate2 = mod[2:]
        x = x + gate1 * self.out(attn)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class JointBlock(nn.Module):
    """MMDiT block: per-modality modulation and weights, one attention over text + image."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, last: bool = False) -> None:
        super().__init__()
        self.img = Stream(width, heads, mlp_ratio)
        self.txt = Stream(width, heads, mlp_ratio, with_output=not last)
        self.record: list[torch.Tensor] | None = None  # attention weights, when explaining (uniref.explain)
        # Called with (q, k, mask) after RoPE, e.g. by the routing loss (uniref.train.routing).
        self.on_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def forward(
        self,
        img: torch.Tensor,  # (R, Li, W)
        txt: torch.Tensor,  # (R, Lt, W)
        temb: torch.Tensor,  # (E, W): the distinct timestep embeddings of the batch
        img_temb_idx: torch.Tensor,  # (R, Li): which embedding modulates each image token
        txt_temb_idx: torch.Tensor,  # (R, Lt)
        rope: torch.Tensor,  # (R, Lt + Li, Dh/2) complex, or (R, Lt + Li, Dh/2, 2) real: see apply_rope
        mask: torch.Tensor,  # (R, 1, L, L) bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Modulations are computed once per distinct embedding (E = B + 1), then gathered per token.
        img_mod = F.embedding(img_temb_idx, self.img.modulation(F.silu(temb))).chunk(6, dim=-1)  # 6 × (R, Li, W)
        txt_mod = F.embedding(txt_temb_idx, self.txt.modulation(F.silu(temb))).chunk(
            6 if self.txt.with_output else 2, -1
        )
        qi, ki, vi = self.img.qkv_heads(img, img_mod)
        qt, kt, vt = self.txt.qkv_heads(txt, txt_mod)
        q = apply_rope(torch.cat([qt, qi], dim=2), rope)
        k = apply_rope(torch.cat([kt, ki], dim=2), rope)
        v = torch.cat([vt, vi], dim=2)
        if self.on_attention is not None:
            self.on_attention(q, k, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (R, H, L, Dh)
        if self.record is not None:  # the same softmax SDPA computes, kept (averaged over heads)
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            self.record.append(logits.masked_fill(~mask, float("-inf")).softmax(-1).mean(1))
        out = out.transpose(1, 2).flatten(2)  # (R, L, W)
        n_txt = txt.shape[1]
        txt = self.txt.finish(txt, out[:, :n_txt], txt_mod) if self.txt.with_output else txt
        return self.img.finish(img, out[:, n_txt:], img_mod), txt


class TextBlock(nn.Module):
    """Pre-norm self-attention block of the word encoder (block-diagonal over packed samples)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1))  # (R, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (R, H, L, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (R, H, L, Dh)
        x = x + self.out(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


@dataclass
class TextImages:
    """The binding part of packed text rows: which picture each text token belongs to (0: the
    instruction), whether it is an image token, and that token's pixels and coordinates."""

    frame: torch.Tensor  # (R, Lt) long
    is_image: torch.Tensor  # (R, Lt) bool
    pixels: torch.Tensor  # (R, Lt, token_dim)
    coords: torch.Tensor  # (R, Lt, 2)
    # The denoiser's text stream holds the words only (R, Lw): the position of each in the encoder's
    # rows, and its sample id (PAD for padding). The thumbnails have done their work once the
    # encoder has read them, and leaving them out keeps the joint blocks as cheap as without binding.
    words_at: torch.Tensor  # (R, Lw) long
    words_ids: torch.Tensor  # (R, Lw) long


# Columns of a bound text item (one row per text token): word id (-1 for an image token), picture
# index (0 for instruction words), two normalised coordinates, then the token's pixel values.
ITEM_WORD, ITEM_FRAME, ITEM_COORDS, ITEM_PIXELS = 0, 1, slice(2, 4), slice(4, None)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of σ·1000 (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * TIMESTEP_SCALE * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyMMDiT(nn.Module):
    """Text encoder + joint-attention denoiser, trained together (nothing is frozen at this size)."""

    _repeated_blocks = ("JointBlock",)  # what compile_repeated_blocks compiles, as in diffusers' models

    def __init__(self, config: TinyConfig, vocab_size: int) -> None:
        super().__init__()
        w = config.width
        self.config = config
        self.word_embed = nn.Embedding(vocab_size, w, padding_idx=PAD_ID)
        self.word_pos = nn.Embedding(config.max_text_len, w)
        self.text_blocks = nn.ModuleList(
            TextBlock(w, config.heads, config.mlp_ratio) for _ in range(config.text_layers)
        )
        self.text_norm = nn.LayerNorm(w)
        if config.binding_budget:
            self.thumb_in = nn.Linear(config.token_dim, w)
        if config.ref_roles:
            if not config.binding_budget:
                raise ValueError("ref_roles needs binding (binding_budget > 0): a role is read from binding tokens")
            self.role_in = nn.Linear(w, w)
            nn.init.zeros_(self.role_in.weight)  # zero: a model grown with roles computes what it did
            nn.init.zeros_(self.role_in.bias)
        self.img_in = nn.Linear(config.token_dim, w)
        self.txt_in = nn.Linear(w, w)
        self.frame_embed = nn.Embedding(config.max_frames, w)
        self.coord_in = nn.Linear(4 * config.coord_freqs, w)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(
            JointBlock(w, config.heads, config.mlp_ratio, last=i == config.depth - 1) for i in range(config.depth)
        )
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.out_mod = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, config.token_dim)
        nn.init.zeros_(self.out_mod.weight)
        nn.init.zeros_(self.out_mod.bias)
        self.gradient_checkpointing = False
        self.blocks_compiled = False  # set by compile_repeated_blocks: RoPE then goes in real form

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in the backward pass: less memory, about a third more time."""
        self.gradient_checkpointing = True

    def compile_repeated_blocks(self, **kwargs: Any) -> None:
        """``torch.compile`` each joint block in place (state-dict keys unchanged), with the name and rule
        of diffusers' ``ModelMixin.compile_repeated_blocks``, so one config switch serves both flavours.
        Most of a tiny step is element-wise work around small matmuls (modulation, RoPE, norms), which
        inductor fuses; on this CPU that pays on one thread only (docs/benchmarks.md)."""
        for block in self.modules():
            if type(block).__name__ in self._repeated_blocks:
                block.compile(**kwargs)
        self.blocks_compiled = True

    def forward(
        self,
        x_t: torch.Tensor,  # (R, Li, token_dim) packed SELF tokens
        position_ids: torch.Tensor,  # (R, Li, 3)
        coords: torch.Tensor,  # (R, Li, 2) per-image normalised coordinates in [-1, 1]
        token_type: torch.Tensor,  # (R, Li)
        img_ids: torch.Tensor,  # (R, Li) sample index or PAD
        words: torch.Tensor,  # (R, Lt) packed word ids
        word_index: torch.Tensor,  # (R, Lt) position of each word in its instruction
        txt_pos: torch.Tensor,  # (R, Lt, 3); with binding (R, Lw, 3): the words' positions
        txt_ids: torch.Tensor,  # (R, Lt) sample index or PAD
        sigma: torch.Tensor,  # (B,)
        binding: TextImages | None = None,
    ) -> torch.Tensor:
        """Predicted clean tokens x̂_0 (R, Li, token_dim)."""
        cfg = self.config
        # The text encoder runs inside forward, on the packed rows, so one forward (and one DDP
        # gradient sync) covers every trained weight.
        txt_h = self.word_embed(words)
        if binding is None:
            txt_h = txt_h + self.word_pos(word_index.clamp(max=cfg.max_text_len - 1))
        else:
            instruction = (binding.frame == 0)[..., None]
            thumb = binding.is_image[..., None]
            txt_h = (
                txt_h
                + instruction * self.word_pos(word_index.clamp(max=cfg.max_text_len - 1))
                + (~instruction) * self.frame_embed(binding.frame.clamp(0, cfg.max_frames - 1))
                + thumb * (self.thumb_in(binding.pixels) + self.coord_in(_fourier(binding.coords, cfg.coord_freqs)))
            )
        text_mask = attention_mask(txt_ids)
        for block in self.text_blocks:
            txt_h = block(txt_h, text_mask)
        txt_h = self.text_norm(txt_h)
        frames = position_ids[..., 0].clamp(0, cfg.max_frames - 1)
        img = self.img_in(x_t) + self.frame_embed(frames) + self.coord_in(_fourier(coords, cfg.coord_freqs))
        if binding is not None and cfg.ref_roles:
            roles = reference_roles(txt_h, binding.frame, txt_ids, sigma.shape[0], cfg.max_frames)
            is_ref = ((img_ids != PAD) & (token_type == REFERENCE))[..., None]
            img = img + is_ref * self.role_in(roles)[img_ids.clamp_min(0) * cfg.max_frames + frames]
        txt_h = self.txt_in(txt_h)
        if binding is not None:
            txt_h = txt_h.gather(1, binding.words_at[..., None].expand(-1, -1, txt_h.shape[-1]))
            txt_ids = binding.words_ids
        # Per-sample embeddings of σ and of 0 (clean references), gathered per token; row B is padding.
        # Embedding table: one row per sample's σ, then σ = 0 (clean references and padding).
        b = sigma.shape[0]
        temb = self.time_embed(timestep_embedding(torch.cat([sigma, sigma.new_zeros(1)]), cfg.width))  # (B+1, W)
        img_idx = torch.where((img_ids == PAD) | (token_type == REFERENCE), b, img_ids)
        txt_idx = torch.where(txt_ids == PAD, b, txt_ids)
        rope = rope_frequencies(torch.cat([txt_pos, position_ids], dim=1).flatten(0, 1), cfg.rope_axes)
        rope = rope.view(x_t.shape[0], -1, rope.shape[-1])
        if self.blocks_compiled:
            rope = torch.view_as_real(rope)
        mask = attention_mask(txt_ids, img_ids)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                img, txt_h = checkpoint(block, img, txt_h, temb, img_idx, txt_idx, rope, mask, use_reentrant=False)
            else:
                img, txt_h = block(img, txt_h, temb, img_idx, txt_idx, rope, mask)
        shift, scale = F.embedding(img_idx, self.out_mod(F.silu(temb))).chunk(2, dim=-1)
        return self.out(self.out_norm(img) * (1 + scale) + shift)


def reference_roles(
    txt_h: torch.Tensor, frame: torch.Tensor, txt_ids: torch.Tensor, n_samples: int, max_frames: int
) -> torch.Tensor:
    """(n_samples · max_frames, W): row ``s · max_frames + i`` is the mean encoder output over sample
    ``s``'s binding tokens of picture ``i`` (its "picture i" label and thumbnail); zero where none.
    ``txt_h`` (R, Lt, W), ``frame`` (R, Lt) picture of each text token (0: instruction words),
    ``txt_ids`` (R, Lt) sample id or PAD."""
    bound = (txt_ids != PAD) & (frame > 0)
    key = (txt_ids.clamp_min(0) * max_frames + frame.clamp(0, max_frames - 1))[bound]
    rows = n_samples * max_frames
    sums = txt_h.new_zeros(rows, txt_h.shape[-1]).index_add(0, key, txt_h[bound])
    counts = txt_h.new_zeros(rows).index_add(0, key, txt_h.new_ones(key.shape[0]))
    return sums / counts.clamp_min(1)[:, None]


def _fourier(coords: torch.Tensor, n: int) -> torch.Tensor:
    freqs = math.pi * 2.0 ** torch.arange(n, dtype=coords.dtype, device=coords.device)
    angles = coords[..., None] * freqs  # (..., 2, n)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def normalised_coords(grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(Σ h·w, 2) token-centre coordinates in [-1, 1] within each image, row-major per image."""
    parts = []
    for h, w in grids:
        rows = (torch.arange(h) + 0.5) / h * 2 - 1
        cols = (torch.arange(w) + 0.5) / w * 2 - 1
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        parts.append(torch.stack([rr, cc], dim=-1).reshape(-1, 2))
    return torch.cat(parts)
