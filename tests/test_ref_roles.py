"""Reference roles (TinyConfig.ref_roles): each reference's tokens get what the text encoder made of its
binding tokens, through a layer that starts at zero."""

from pathlib import Path

import pytest
import torch
from benchmarks.grow_tiny import main, with_ref_roles

from test_probe_tools import _open_gates
from uniref.data import TaskConfig, generate, parse_tasks
from uniref.models.tiny import TinyConfig, build_tiny, load_tiny_folder
from uniref.models.tiny_net import reference_roles
from uniref.sequence import PAD
from uniref.train.batch import make_batch

BOUND = TinyConfig(
    width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0, binding_budget=16 * 16
)
SAMPLES = [generate(i, TaskConfig(parse_tasks("compose"), 4)) for i in range(3)]


def _x0(model, samples, seeds) -> tuple[torch.Tensor, list]:
    batch = make_batch(model, samples, 48 * 48, 48 * 48, seeds)
    cond = model.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)
    with torch.no_grad():
        x0 = model.predict_x0(batch.packed, cond, batch.sigma)
    return x0, batch.packed.target_tokens(x0)


def test_a_role_is_the_mean_of_its_pictures_binding_tokens_per_sample() -> None:
    h = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    frame = torch.tensor([[0, 1, 1, 2, 0], [0, 1, 1, 1, 0]])
    ids = torch.tensor([[0, 0, 0, 0, PAD], [1, 1, 1, 2, 2]])  # row 2 holds sample 1 and a part of sample 2
    roles = reference_roles(h, frame, ids, n_samples=3, max_frames=4).view(3, 4, 2)
    torch.testing.assert_close(roles[0, 1], (h[0, 1] + h[0, 2]) / 2)
    torch.testing.assert_close(roles[0, 2], h[0, 3])
    torch.testing.assert_close(roles[1, 1], (h[1, 1] + h[1, 2]) / 2)
    torch.testing.assert_close(roles[2, 1], h[1, 3])
    assert roles[0, 0].abs().sum() == 0 and roles[2, 2].abs().sum() == 0  # no binding token: zero


def test_roles_start_at_zero_then_learn_and_a_sample_reads_only_its_own_roles(tmp_path: Path) -> None:
    model = _open_gates(build_tiny(BOUND, seed=1))
    grown = with_ref_roles(model)
    torch.testing.assert_close(_x0(grown, SAMPLES, [0, 1, 2])[0], _x0(model, SAMPLES, [0, 1, 2])[0])
    # The zero layer gets a gradient: fine-tuning can move it.
    batch = make_batch(grown, SAMPLES, 48 * 48, 48 * 48, [0, 1, 2])
    cond = grown.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)
    grown.net.train()
    grown.predict_x0(batch.packed, cond, batch.sigma).square().mean().backward()
    assert grown.net.role_in.weight.grad.abs().sum() > 0
    grown.net.eval()
    with torch.no_grad():
        grown.net.role_in.weight.normal_(0, 0.5)
    together = _x0(grown, SAMPLES, [0, 1, 2])[1]
    assert not torch.allclose(together[0], _x0(model, SAMPLES, [0, 1, 2])[1][0], atol=1e-3)
    for i, sample in enumerate(SAMPLES):  # packed with others or alone: the same prediction
        torch.testing.assert_close(_x0(grown, [sample], [i])[1][0], together[i], rtol=1e-4, atol=1e-5)
    main([str(model.save(tmp_path / "m")), "--ref-roles", "-o", str(tmp_path / "roles")])
    assert load_tiny_folder(tmp_path / "roles").config.ref_roles
    with pytest.raises(ValueError, match="already has reference roles"):
        with_ref_roles(grown)


def test_roles_without_binding_are_refused() -> None:
    with pytest.raises(ValueError, match="ref_roles needs binding"):
        build_tiny(TinyConfig(width=32, depth=2, heads=2, rope_axes=(4, 6, 6), ref_roles=True))
