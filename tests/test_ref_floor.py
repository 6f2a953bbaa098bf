"""A floor on each reference's share of the joint budget (``ref_floor``): more tokens for K >= 3 only."""

from dataclasses import replace
from pathlib import Path

import pytest

from uniref.data import TaskConfig, generate, parse_tasks
from uniref.models.tiny import TinyConfig, build_tiny, load_tiny_folder
from uniref.pipeline import EditPipeline
from uniref.train.batch import make_batch

SMALL = TinyConfig(width=32, depth=1, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0)


def _area(sizes) -> int:
    return sum(s.width * s.height for s in sizes)


def test_joint_budget_is_the_larger_of_the_budget_and_k_floors() -> None:
    spec = replace(SMALL, ref_budget=128 * 128, ref_floor=90 * 90).spec()
    assert [spec.joint_ref_budget(k) for k in (1, 2, 3, 6)] == [16384, 16384, 3 * 8100, 6 * 8100]
    flat = replace(SMALL, ref_budget=128 * 128).spec()
    assert {flat.joint_ref_budget(k) for k in range(1, 7)} == {16384}


def test_the_pipeline_plans_k_references_under_the_floor_unless_a_budget_is_given() -> None:
    pipe = EditPipeline(build_tiny(replace(SMALL, ref_budget=48 * 48, target_budget=48 * 48, ref_floor=32 * 32)))
    sample = generate(3, TaskConfig(parse_tasks("compose"), 4))
    while sample.k < 4:
        sample = generate(sample.spec["seed"] + 1, TaskConfig(parse_tasks("compose"), 4))
    one, _ = pipe.plan_sizes(sample.refs[:1])
    assert one.budget_pixels == 48 * 48 and _area(one.sizes) <= 48 * 48
    four, _ = pipe.plan_sizes(sample.refs)
    assert four.budget_pixels == 4 * 32 * 32 and 48 * 48 < _area(four.sizes) <= 4 * 32 * 32
    given, _ = pipe.plan_sizes(sample.refs, budget=48)  # a side, as on the CLI
    assert given.budget_pixels == 48 * 48


def test_training_batches_give_many_references_more_pixels_and_export_records_the_floor(tmp_path: Path) -> None:
    model = build_tiny(SMALL)
    config = TaskConfig(parse_tasks("add,compose"), 4)
    samples = [generate(i, config) for i in range(12)]
    assert {s.k for s in samples} >= {1, 3}
    flat = make_batch(model, samples, 48 * 48, 48 * 48, list(range(12)))
    floored = make_batch(model, samples, 48 * 48, 48 * 48, list(range(12)), ref_floor=32 * 32)
    for sample, a, b in zip(samples, flat.ref_sizes, floored.ref_sizes, strict=True):
        if sample.k * 32 * 32 <= 48 * 48:
            assert a == b  # one or two references: the budget alone decides
        else:
            assert _area(a) <= 48 * 48 < _area(b) <= sample.k * 32 * 32

    from test_sft import _config
    from uniref.train.export import export_run
    from uniref.train.sft import train_sft

    run = tmp_path / "run"
    train_sft(_config(run, "train.max_steps=2", "stages=[{budget: 32, ref_floor: 24, steps: 2, batch_size: 4}]"))
    folder = export_run(run, tmp_path / "model")
    assert load_tiny_folder(folder).spec.ref_floor == 24 * 24


def test_a_bad_floor_is_refused_by_the_config() -> None:
    from pydantic import ValidationError

    from uniref.train.config import StageSection

    with pytest.raises(ValidationError, match="ref_floor"):
        StageSection(budget=64, ref_floor=0, steps=1, batch_size=1)
