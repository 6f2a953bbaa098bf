import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref.sequence import (
    PAD,
    REFERENCE,
    TARGET,
    SelfSequence,
    attention_mask,
    build_sequence,
    centred_positions,
    pack_sequences,
    pack_stream,
    patchify,
    plan_rows,
    rope_frequencies,
    text_position_ids,
    text_position_start,
    unpatchify,
)

grid = st.tuples(st.integers(1, 6), st.integers(1, 6))


def _latents(grids: list[tuple[int, int]], channels: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, 2 * h, 2 * w, generator=g, dtype=torch.float64) for h, w in grids]


def _sequence(grids: list[tuple[int, int]], channels: int = 4, seed: int = 0) -> SelfSequence:
    target, *refs = _latents(grids, channels, seed)
    return build_sequence(target, refs)


@settings(max_examples=50, deadline=None)
@given(grids=st.lists(grid, min_size=2, max_size=6))
def test_build_sequence_then_unpack_is_exact(grids: list[tuple[int, int]]) -> None:
    target, *refs = _latents(grids)
    seq = build_sequence(target, refs)
    assert seq.tokens.dtype == torch.float64
    assert torch.equal(seq.target_latent(), target)
    for i, ref in enumerate(refs, start=1):
        assert torch.equal(seq.ref_latent(i), ref)
    assert seq.segment_lens == [h * w for h, w in grids]
    assert seq.num_refs == len(refs)


def test_patchify_matches_diffusers_pack_latents() -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline

    latent = torch.randn(16, 6, 10, dtype=torch.float64)
    theirs = QwenImageEditPlusPipeline._pack_latents(latent[None], 1, 16, 6, 10)[0]
    assert torch.equal(patchify(latent), theirs)
    assert torch.equal(unpatchify(theirs, 3, 5), latent)


def test_positions_frames_types_and_zero_timestep_mask() -> None:
    seq = build_sequence(*_latents([(2, 3)])[:1], _latents([(1, 2), (3, 1)], seed=1))
    frames = seq.position_ids[:, 0].tolist()
    assert frames == [0] * 6 + [1] * 2 + [2] * 3
    assert seq.token_type.tolist() == [TARGET] * 6 + [REFERENCE] * 5
    assert seq.zero_timestep_mask.tolist() == [False] * 6 + [True] * 5
    assert centred_positions(3).tolist() == [-2, -1, 0]
    assert centred_positions(4).tolist() == [-2, -1, 0, 1]
    assert seq.img_shapes() == [(1, 2, 3), (1, 1, 2), (1, 3, 1)]


@settings(max_examples=25, deadline=None)
@given(grids=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4))
def test_rotary_factors_equal_diffusers_qwen_embed_rope(grids: list[tuple[int, int]]) -> None:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes_dim = [8, 12, 12]
    rope = QwenEmbedRope(theta=10000, axes_dim=axes_dim, scale_rope=True)
    img_shapes = [[(1, h, w) for h, w in grids]]
    txt_len = 7
    vid_freqs, txt_freqs = rope(img_shapes, device=torch.device("cpu"), max_txt_seq_len=txt_len)

    target, *refs = _latents(grids, seed=3)
    seq = build_sequence(target, refs)
    ours_img = rope_frequencies(seq.position_ids, axes_dim)
    ours_txt = rope_frequencies(text_position_ids(txt_len, text_position_start(seq.grids)), axes_dim)
    torch.testing.assert_close(ours_img, vid_freqs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_txt, txt_freqs, rtol=0, atol=1e-5)


def test_plan_rows_first_fit_decreasing_respects_capacity() -> None:
    rows = plan_rows([5, 3, 4, 2, 6], capacity=8)
    lengths = [5, 3, 4, 2, 6]
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3


def test_pack_stream_round_trips_and_marks_padding() -> None:
    tensors = [torch.arange(n, dtype=torch.float64)[:, None] + 10 * i for i, n in enumerate([3, 5, 2])]
    rows = plan_rows([3, 5, 2], capacity=5)
    packed = pack_stream(rows, tensors, pad_to=4)
    assert packed.values.shape[1] == 8
    for a, b in zip(packed.unpack(), tensors, strict=True):
        assert torch.equal(a, b)
    assert int((packed.sample_ids == PAD).sum()) == packed.values.shape[0] * 8 - 10
    assert 0 < packed.real_fraction < 1


@settings(max_examples=20, deadline=None)
@given(
    samples=st.lists(st.lists(grid, min_size=2, max_size=4), min_size=1, max_size=5),
    txt_lens=st.lists(st.integers(1, 5), min_size=5, max_size=5),
)
def test_packed_attention_equals_per_sample_attention(
    samples: list[list[tuple[int, int]]], txt_lens: list[int]
) -> None:
    """Joint text+image attention over packed rows sees nothing of the other samples."""
    dim = 8
    seqs = [_sequence(g, channels=2, seed=i) for i, g in enumerate(samples)]
    txts = [torch.randn(txt_lens[i], dim, dtype=torch.float64) for i in range(len(seqs))]
    imgs = [torch.randn(s.tokens.shape[0], dim, dtype=torch.float64) for s in seqs]
    capacity = max(t.shape[0] + i.shape[0] for t, i in zip(txts, imgs, strict=True)) + 3
    batch = pack_sequences(seqs, capacity=capacity, extra_lengths=[t.shape[0] for t in txts])
    txt_packed = pack_stream(batch.rows, txts)
    img_packed = batch.pack_like(imgs)
    joint = torch.cat([txt_packed.values, img_packed], dim=1)[:, None]  # (R, 1, L, D)
    mask = attention_mask(txt_packed.sample_ids, batch.sample_ids)
    out = F.scaled_dot_product_attention(joint, joint, joint, attn_mask=mask)[:, 0]
    assert torch.isfinite(out).all()
    txt_out = txt_packed.unpack(out[:, : txt_packed.values.shape[1]])
    img_out = batch.tokens.unpack(out[:, txt_packed.values.shape[1] :])
    for t, i, t_out, i_out in zip(txts, imgs, txt_out, img_out, strict=True):
        x = torch.cat([t, i])[None, None]
        alone = F.scaled_dot_product_attention(x, x, x)[0, 0]
        torch.testing.assert_close(torch.cat([t_out, i_out]), alone, rtol=1e-10, atol=1e-10)


def test_packed_batch_target_tokens_and_types() -> None:
    seqs = [_sequence(g, seed=i) for i, g in enumerate([[(2, 2), (1, 1)], [(1, 3), (2, 1), (1, 1)]])]
    batch = pack_sequences(seqs)
    targets = batch.target_tokens(batch.tokens.values)
    for seq, tgt in zip(seqs, targets, strict=True):
        assert torch.equal(tgt, seq.tokens[: seq.num_target_tokens])
    assert int(batch.target_mask.sum()) == 4 + 3
    assert set(batch.token_type.unique().tolist()) <= {TARGET, REFERENCE, PAD}


def test_self_sequences_of_mixed_k_pack_densely() -> None:
    """SELF keeps every sample near the same length, so rows fill almost completely."""
    from uniref.budget import Size, plan

    g = torch.Generator().manual_seed(0)
    seqs = []
    for k in [1, 2, 3, 4, 5, 6, 7, 8]:
        refs = plan([Size(300 + 40 * i, 200 + 30 * i) for i in range(k)], 64 * 64, 8).sizes
        target = torch.randn(1, 16, 16, generator=g)
        ref_lat = [torch.randn(1, s.height // 4, s.width // 4, generator=g) for s in refs]
        seqs.append(build_sequence(target, ref_lat))
    lengths = [s.tokens.shape[0] for s in seqs]
    batch = pack_sequences(seqs, capacity=max(lengths))
    assert batch.real_fraction >= 0.95
