import dataclasses
from pathlib import Path

import pytest
import torch

from uniref.budget import Size
from uniref.models import load_model
from uniref.models.tiny import TinyConfig, TinyModel, WordTokenizer, build_tiny
from uniref.models.tiny_net import apply_rope, normalised_coords
from uniref.sequence import build_sequence, pack_sequences

WORDS = ("put", "the", "red", "circle", "from", "picture", "on", "background", "of", "1", "2", "3")
SMALL = TinyConfig(vocabulary=WORDS, width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2)


BOUND = TinyConfig(**{**SMALL.__dict__, "binding_budget": 16 * 16})


def _pictures(n: int, seed: int) -> list:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(24, 16 + 8 * i, 3, generator=g) * 255).byte().numpy()) for i in range(n)]


def _sample(model: TinyModel, grids: list[tuple[int, int]], seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    c = model.spec.latent_channels
    lat = [torch.randn(c, 2 * h, 2 * w, generator=g) for h, w in grids]
    return build_sequence(lat[0], lat[1:])


def test_velocity_of_packed_batch_equals_each_sample_alone() -> None:
    model = build_tiny(SMALL, seed=1)
    torch.manual_seed(0)
    for p in model.net.parameters():  # zero-initialised modulations would hide leaks
        p.data.normal_(0, 0.2)
    seqs = [_sample(model, [(2, 3), (2, 2)], 0), _sample(model, [(3, 2), (1, 2), (2, 1), (1, 1)], 1)]
    cond = model.encode_condition(["put the red circle", "the background of picture 2"], [[], []], [[], []])
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = pack_sequences(seqs, capacity=64, extra_lengths=[t.shape[0] for t in cond.txt])
        assert len(together.rows) == 1  # both samples share one row: a leak would show
        v_all = together.target_tokens(model.velocity(together, cond, sigma))
        for i, seq in enumerate(seqs):
            alone = pack_sequences([seq])
            v_one = alone.target_tokens(model.velocity(alone, cond.select([i]), sigma[i : i + 1]))[0]
            torch.testing.assert_close(v_all[i], v_one, rtol=1e-4, atol=1e-5)


def test_velocity_is_x_t_minus_predicted_clean_over_sigma() -> None:
    model = build_tiny(SMALL)
    seq = _sample(model, [(2, 2), (2, 2)], 0)
    batch = pack_sequences([seq])
    cond = model.encode_condition(["put the red circle"], [[]], [[]])
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        x0 = model.predict_x0(batch, cond, sigma)
        v = model.velocity(batch, cond, sigma)
    torch.testing.assert_close(v, (batch.tokens.values - x0) / 0.5)


def test_codec_is_exact_and_declares_its_geometry() -> None:
    model = build_tiny(SMALL)
    img = torch.rand(3, 24, 40) * 2 - 1
    lat = model.encode_images([img])[0]
    assert lat.shape == (48, 6, 10)
    assert torch.equal(model.decode_latents([lat])[0], img)
    assert model.spec.token_pixels == 8 and model.spec.plan_multiple == 8


def test_unknown_words_warn_and_name_the_words() -> None:
    model = build_tiny(SMALL)
    with pytest.warns(UserWarning, match=r"ignored \(read as <unk>\): zebra, sofa$"):
        cond = model.encode_condition(["put the zebra on the sofa", "the zebra"], [[], []], [[], []])
    assert cond.txt[0].shape == (6,) and int((cond.txt[0] == 1).sum()) == 2  # two <unk>
    assert WordTokenizer(WORDS).encode("Picture 2!", 8) == ([WordTokenizer(WORDS).ids["picture"], 12], [])


def test_empty_instruction_still_encodes() -> None:
    model = build_tiny(SMALL)
    cond = model.encode_condition([""], [[]], [[]])
    assert cond.txt[0].tolist() == [0]


@pytest.mark.parametrize("bound", [False, True], ids=["words", "binding"])
def test_save_then_load_gives_identical_outputs(tmp_path: Path, bound: bool) -> None:
    model = build_tiny(BOUND if bound else SMALL, seed=3)
    for p in model.net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, TinyModel) and loaded.config == model.config
    seq = _sample(model, [(2, 2), (1, 3)], 2)
    batch = pack_sequences([seq])
    sigma = torch.tensor([0.7])
    refs = [_pictures(1, 4)] if bound else [[]]
    with torch.no_grad():
        a = model.velocity(batch, model.encode_condition(["the red circle"], refs, [[]]), sigma)
        b = loaded.velocity(batch, loaded.encode_condition(["the red circle"], refs, [[]]), sigma)
    assert torch.equal(a, b)


def test_same_seed_same_weights() -> None:
    a, b = build_tiny(SMALL, seed=5), build_tiny(SMALL, seed=5)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_normalised_coords_span_each_image() -> None:
    coords = normalised_coords([(2, 4), (1, 1)])
    assert coords.shape == (9, 2)
    assert coords[:8].min() == -0.75 and coords[:8].max() == 0.75
    assert coords[8].tolist() == [0.0, 0.0]


def test_planning_uses_the_models_multiple() -> None:
    from uniref.budget import plan

    model = build_tiny(SMALL)
    result = plan([Size(300, 200), Size(90, 120)], model.spec.ref_budget, model.spec.plan_multiple)
    assert all(s.width % 8 == 0 and s.height % 8 == 0 for s in result.sizes)
    assert result.total_pixels <= 64 * 64


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = build_tiny(SMALL, seed=4)
        for p in model.net.parameters():
            p.data.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing:
            model.net.enable_gradient_checkpointing()
        model.net.train()
        batch = pack_sequences([_sample(model, [(2, 2), (1, 3)], 0)])
        cond = model.encode_condition(["put the red circle"], [[]], [[]])
        model.velocity(batch, cond, torch.tensor([0.4])).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_shipped_tiny_weights_load_without_warning_and_differ_from_random() -> None:
    import warnings

    from uniref.models.tiny import SHIPPED_DIR, WEIGHTS_FILE

    assert (SHIPPED_DIR / WEIGHTS_FILE).is_file()  # the embedded default ships with the package
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random weights" warning
        shipped = load_model("tiny")
    # The same architecture at random init (the shipped codec is the scene autoencoder).
    random = build_tiny(dataclasses.replace(shipped.config, codec="scenes"))
    assert shipped.name == "tiny" and shipped.spec.ref_budget >= 64 * 64
    a = dict(shipped.net.named_parameters())["img_in.weight"]
    b = dict(random.net.named_parameters())["img_in.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_binding_puts_each_reference_after_its_picture_label_in_the_text_stream() -> None:
    model = build_tiny(BOUND, seed=2)
    refs = _pictures(2, 0)
    cond = model.encode_condition(["put the red circle from picture 2"], [refs], [[]])
    item = cond.txt[0]
    n_words = 7
    frames = item[:, 1].long().tolist()
    assert frames[:n_words] == [0] * n_words
    assert item[n_words : n_words + 2, 0].long().tolist() == [model.tokenizer.ids["picture"], model.tokenizer.ids["1"]]
    assert set(frames[n_words:]) == {1, 2} and (item[:, 0] < 0).sum() == len(item) - n_words - 4


def test_bound_velocity_of_packed_batch_equals_each_sample_alone_and_reads_the_references() -> None:
    model = build_tiny(BOUND, seed=1)
    torch.manual_seed(0)
    for p in model.net.parameters():
        p.data.normal_(0, 0.2)
    seqs = [_sample(model, [(2, 3), (2, 2)], 0), _sample(model, [(3, 2), (1, 2), (2, 1)], 1)]
    refs = [_pictures(1, 1), _pictures(2, 2)]
    cond = model.encode_condition(["put the red circle", "the background of picture 2"], refs, [[], []])
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        together = pack_sequences(seqs, capacity=128, extra_lengths=[t.shape[0] for t in cond.txt])
        assert len(together.rows) == 1
        v_all = together.target_tokens(model.velocity(together, cond, sigma))
        for i, seq in enumerate(seqs):
            alone = pack_sequences([seq])
            v_one = alone.target_tokens(model.velocity(alone, cond.select([i]), sigma[i : i + 1]))[0]
            torch.testing.assert_close(v_all[i], v_one, rtol=1e-4, atol=1e-5)
        other = model.encode_condition(["put the red circle"], [_pictures(1, 9)], [[]])
        alone = pack_sequences([seqs[0]])
        v_other = alone.target_tokens(model.velocity(alone, other, sigma[:1]))[0]
    assert not torch.allclose(v_other, v_all[0])  # the text stream sees the reference's pixels


def test_bound_thumbnails_feed_the_text_encoder_but_not_the_joint_blocks() -> None:
    model = build_tiny(BOUND, seed=1)
    seq = _sample(model, [(2, 2), (2, 2), (2, 1)], 0)
    cond = model.encode_condition(["put the red circle from picture 2"], [_pictures(2, 3)], [[]])
    seen: list[int] = []
    hook = model.net.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
    with torch.no_grad():
        model.velocity(pack_sequences([seq]), cond, torch.tensor([0.5]))
    hook.remove()
    words = int((cond.txt[0][:, 0] >= 0).sum())  # instruction words + "picture i" labels
    assert seen == [words] and words < cond.txt[0].shape[0]


def test_rope_in_real_form_rotates_as_the_complex_product() -> None:
    # Compiled blocks take the real (cos, sin) form; eager keeps the complex one: both must agree.
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    rotation = torch.polar(torch.ones(2, 5, 4), torch.randn(2, 5, 4))
    complex_form = apply_rope(x, rotation)
    real_form = apply_rope(x, torch.view_as_real(rotation))
    torch.testing.assert_close(real_form, complex_form)
    weights = torch.randn_like(x)  # a rotation keeps norms, so weigh the outputs to test its backward
    (grad_c,) = torch.autograd.grad((complex_form * weights).sum(), x)
    (grad_r,) = torch.autograd.grad((real_form * weights).sum(), x)
    torch.testing.assert_close(grad_r, grad_c)
    assert not torch.allclose(complex_form, x)  # it does rotate
