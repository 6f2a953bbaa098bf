import numpy as np
import pytest
from PIL import Image, ImageFilter

from uniref.budget import Size
from uniref.data.scenes import Scene, render
from uniref.data.tasks import TaskConfig, generate
from uniref.rewards import SampleScore, Scorer, score

COMPOSE = TaskConfig(tasks=("compose",), max_refs=4)
SEEDS = range(12)


def _with_target_objects(sample, change) -> Image.Image:
    """The sample's target re-rendered after ``change(objects) -> objects``."""
    t = sample.spec["target"]
    scene = Scene.from_json(t["scene"])
    return render(Scene(scene.background, tuple(change(list(scene.objects)))), Size(t["width"], t["height"]))


def _object_refs(sample) -> list[int]:
    return [i for i, r in enumerate(sample.spec["refs"]) if r["contributes"][0]["what"] == "object"]


def test_ground_truth_scores_perfect_on_every_task():
    for seed in range(40):
        s = generate(seed, TaskConfig(max_refs=6))
        r = score(s.target, s)
        assert r.worst_ref > 0.999 and r.instruction == 1.0 and r.quality > 0.999, (s.task, r)


def test_output_of_another_size_is_resized_and_keeps_every_reference_far_above_chance():
    s = generate(3, COMPOSE)
    big = s.target.resize((s.target.width * 2, s.target.height * 2), Image.Resampling.LANCZOS)
    r = score(big, s)
    assert r.worst_ref > 0.75 and r.instruction == 1.0  # resampling blurs small patterned objects a little


def test_blank_and_other_targets_score_near_chance():
    for seed in SEEDS:
        s = generate(seed, COMPOSE)
        other = generate(seed + 1000, COMPOSE)
        scorer = Scorer(s)
        for bad in (Image.new("RGB", s.target.size, (128, 128, 128)), other.target):
            r = scorer(bad)
            assert r.worst_ref < 0.3 and r.instruction <= 0.5, r


def test_swapping_two_objects_places_is_caught_per_reference():
    checked = 0
    for seed in SEEDS:
        s = generate(seed, COMPOSE)
        if len(s.spec["target"]["scene"]["objects"]) < 2:
            continue

        def swap(objs):
            a, b = objs[0], objs[1]
            return [a.replace(cx=b.cx, cy=b.cy), b.replace(cx=a.cx, cy=a.cy), *objs[2:]]

        r = score(_with_target_objects(s, swap), s)
        refs = [i for i in _object_refs(s) if s.spec["refs"][i]["contributes"][0]["object"] in (0, 1)]
        assert all(r.ref_scores[i] < 0.5 for i in refs), r
        assert r.instruction < 1.0
        checked += 1
    assert checked >= 3


def test_swapping_two_objects_colours_is_caught_per_reference():
    checked = 0
    for seed in SEEDS:
        s = generate(seed, COMPOSE)
        if len(s.spec["target"]["scene"]["objects"]) < 2:
            continue

        def swap(objs):
            a, b = objs[0], objs[1]
            return [a.replace(colour=b.colour), b.replace(colour=a.colour), *objs[2:]]

        r = score(_with_target_objects(s, swap), s)
        refs = [i for i in _object_refs(s) if s.spec["refs"][i]["contributes"][0]["object"] in (0, 1)]
        assert all(r.ref_scores[i] < 0.5 for i in refs), r
        others = [i for i in range(s.k) if i not in refs]
        assert all(r.ref_scores[i] > 0.95 for i in others), r  # untouched references keep their score
        checked += 1
    assert checked >= 3


def test_dropping_one_object_costs_only_its_reference():
    s = next(x for x in (generate(i, COMPOSE) for i in SEEDS) if len(x.spec["target"]["scene"]["objects"]) >= 2)
    r = score(_with_target_objects(s, lambda objs: objs[1:]), s)
    dropped = next(i for i in _object_refs(s) if s.spec["refs"][i]["contributes"][0]["object"] == 0)
    assert r.worst_ref == r.ref_scores[dropped] < 0.3
    assert sorted(r.ref_scores)[1] > 0.9


def test_scores_are_in_unit_interval_and_serialisable():
    s = generate(5, TaskConfig(max_refs=5))
    noise = np.random.default_rng(0).integers(0, 256, (s.target.height, s.target.width, 3), dtype=np.uint8)
    r = score(noise, s)
    assert isinstance(r, SampleScore)
    assert all(0.0 <= v <= 1.0 for v in [*r.ref_scores, r.instruction, r.quality])
    assert set(r.to_json()) >= {"ref_scores", "worst_ref", "instruction", "quality"}


def test_sample_without_spec_is_refused():
    s = generate(1, COMPOSE)
    s.spec = {}
    with pytest.raises(ValueError, match="spec"):
        Scorer(s)


def _down_up(img: Image.Image) -> Image.Image:
    w, h = img.size
    small = img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    return small.resize((w, h), Image.Resampling.LANCZOS)


def test_ground_truth_resampled_down_and_up_keeps_every_reference_consistent():
    worst = [score(_down_up(s.target), s).worst_ref for s in (generate(seed, COMPOSE) for seed in SEEDS)]
    assert np.mean(worst) >= 0.9 and min(worst) >= 0.85, worst


def test_ground_truth_blurred_by_0_7_px_keeps_every_reference_consistent():
    for seed in SEEDS:
        s = generate(seed, TaskConfig(max_refs=4))
        r = score(s.target.filter(ImageFilter.GaussianBlur(0.7)), s)
        assert r.worst_ref >= 0.85 and r.instruction == 1.0, (s.task, r)


def test_softness_still_costs_quality():
    s = generate(0, COMPOSE)  # a large grid background: plenty of sharp structure
    assert score(_down_up(s.target), s).quality < 0.9 < 0.999 < score(s.target, s).quality


def test_output_smaller_than_target_is_judged_at_its_own_resolution():
    s = generate(4, COMPOSE)
    half = s.target.resize((s.target.width // 2, s.target.height // 2), Image.Resampling.LANCZOS)
    r = score(half, s)
    assert r.details["analysis_sigma"] > score(s.target, s).details["analysis_sigma"]
    assert r.worst_ref >= 0.85, r


def test_background_like_scores_an_output_against_another_pictures_background() -> None:
    from uniref.data.splits import split_samples

    sample = next(s for s in split_samples("val", 20, TaskConfig(("compose",), 4)) if s.k >= 3)
    scorer = Scorer(sample)
    scenes = [Scene.from_json(r["scene"]) for r in sample.spec["refs"]]
    named = next(i for i, r in enumerate(sample.spec["refs"]) if r["contributes"][0]["what"] == "background")
    likes = [scorer.background_like(sample.target, scene) for scene in scenes]
    assert likes[named] == max(likes) > 0.9  # the target's background is the named picture's
    assert likes[named] == pytest.approx(scorer(sample.target).details["background"], abs=0.05)
    assert min(likes) < 0.5
