"""The stochastic (SDE) sampler: noise_level 0 is the Euler ODE, noise per request seed, model default."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from uniref import flow
from uniref.data import TaskConfig, generate, parse_tasks
from uniref.models.tiny import TinyConfig, build_tiny, load_tiny_folder
from uniref.pipeline import EditPipeline

SMALL = TinyConfig(width=32, depth=2, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def pipe() -> EditPipeline:
    return EditPipeline(build_tiny(SMALL, seed=4))


def _samples(n: int) -> list:
    return [generate(i, TaskConfig(parse_tasks("add,compose"), 3)) for i in range(n)]


def _latents(pipe: EditPipeline, samples, seeds, noise_level) -> list[torch.Tensor]:
    result = pipe.generate(
        [s.instruction for s in samples],
        [s.refs for s in samples],
        seed=seeds,
        steps=4,
        budget=48,
        target_budget=48,
        noise_level=noise_level,
        progress=False,
        decode=False,
    )
    return result.latents


def test_noise_level_zero_is_the_euler_sampler_and_a_positive_one_is_seeded_per_request(pipe) -> None:
    samples = _samples(3)
    euler = _latents(pipe, samples, [5, 6, 7], None)  # the tiny default is 0
    torch.testing.assert_close(_latents(pipe, samples, [5, 6, 7], 0.0), euler, rtol=0, atol=0)
    sde = _latents(pipe, samples, [5, 6, 7], 0.7)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(sde, euler, strict=True))
    # The same seed gives the same output whether the request is alone or in a batch, first or last.
    alone = _latents(pipe, samples[2:], [7], 0.7)
    torch.testing.assert_close(alone[0], sde[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_latents(pipe, samples, [5, 6, 7], 0.7), sde, rtol=0, atol=0)
    assert (_latents(pipe, samples[2:], [8], 0.7)[0] - sde[2]).abs().max() > 1e-3


def test_the_sde_steps_are_flow_sde_steps_and_the_last_step_is_euler(pipe) -> None:
    (sample,) = _samples(1)
    prep = pipe.prepare(sample.instruction, list(sample.refs), steps=3, budget=48, target_budget=48)
    prep.noise_level, seen = 0.5, []
    pipe._denoise(
        prep.sequences, prep.cond, prep.neg_cond, prep.schedules, prep.guidance, False, None,
        lambda i, sigma, xs, v: seen.append((xs[0].clone(), v[0].clone())), noise_level=0.5, seeds=[0],
    )  # fmt: skip
    final = pipe.denoise(prep)[0]
    sch = prep.schedules[0]
    # Replaying the recorded states: step i maps state i to state i + 1 by flow.sde_step with the
    # request's own noise stream, and the last step (to σ = 0) is a plain Euler step.
    from uniref.pipeline import SAMPLER_SEED_OFFSET

    gen = torch.Generator().manual_seed(SAMPLER_SEED_OFFSET)
    for i in range(2):
        x, v = seen[i]
        noise = torch.randn(x.shape, generator=gen)
        step = flow.sde_step(x, v, sch[i].float(), sch[i + 1].float(), 0.5, noise=noise).x_next
        torch.testing.assert_close(step, seen[i + 1][0], rtol=1e-5, atol=1e-5)
    x, v = seen[2]
    torch.testing.assert_close(flow.euler_step(x, v, sch[2].float(), sch[3].float()), final, rtol=1e-5, atol=1e-5)


def test_a_tiny_models_noise_level_is_its_default_and_survives_saving(tmp_path: Path) -> None:
    assert build_tiny(SMALL).default_noise_level == 0.0
    model = build_tiny(SMALL)
    model.save(tmp_path / "m", noise_level=0.6)
    assert load_tiny_folder(tmp_path / "m").default_noise_level == 0.6
    with pytest.raises(ValueError, match="noise_level=-1"):
        EditPipeline(model).prepare("put a red circle at the top", [Image.new("RGB", (48, 48))], noise_level=-1)


def test_edit_and_export_take_a_noise_level_and_refuse_a_negative_one(tmp_path: Path, capsys) -> None:
    folder = build_tiny(SMALL, seed=2).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(ref)
    base = ["edit", "put a red circle at the top", "--ref", str(ref), "--model", str(folder), "--steps", "3"]
    outs = {}
    for level in ("0", "0.8"):
        out = tmp_path / f"out{level}.png"
        code, _, err = run_cli([*base, "-o", str(out), "--noise-level", level, "--no-progress"], capsys)
        assert code == 0, err
        outs[level] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(outs["0"] - outs["0.8"]).max() > 0
    code, _, err = run_cli([*base, "-o", str(tmp_path / "bad.png"), "--noise-level", "-1"], capsys)
    assert code == 2 and "--noise-level" in err and not (tmp_path / "bad.png").exists()
