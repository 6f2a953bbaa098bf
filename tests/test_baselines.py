"""The headline score and the trivial baselines it is read against (issue 17 §1)."""

from __future__ import annotations

import pytest

from uniref.data import TaskConfig, parse_tasks
from uniref.data.splits import split_samples
from uniref.eval import BASELINES, baseline_output, evaluate_baselines
from uniref.rewards.metrics import Scorer

# A fixed test-split sample set: every task, K = 1..6.
N_SAMPLES = 96
BASELINE_CEILING = 0.25


@pytest.fixture(scope="module")
def samples():
    return split_samples("test", N_SAMPLES, TaskConfig(parse_tasks("edit,compose"), 6))


@pytest.fixture(scope="module")
def baselines(samples):
    return evaluate_baselines(samples)


def test_ground_truth_scores_overall_one(samples):
    assert all(Scorer(s)(s.target).overall == pytest.approx(1.0) for s in samples[:24])


def test_overall_is_the_geometric_mean_of_instruction_and_worst_reference(samples):
    s = samples[0]
    score = Scorer(s)(baseline_output("grey", samples, 0))
    assert score.overall == pytest.approx((score.instruction * score.worst_ref) ** 0.5)


@pytest.mark.parametrize("name", BASELINES)
def test_every_trivial_output_scores_at_most_a_quarter_overall_and_at_every_k(baselines, name):
    report = baselines[name]
    assert report.overall <= BASELINE_CEILING
    assert set(report.by_k) == {1, 2, 3, 4, 5, 6}
    assert all(m["overall"] <= BASELINE_CEILING for m in report.by_k.values()), report.by_k


def test_copying_picture_one_fails_a_removal_even_of_a_patterned_object():
    removals = split_samples("test", 40, TaskConfig(("remove",), 1))
    patterned = [s for s in removals if s.spec["checks"][0]["obj"]["pattern"] != "solid"]
    assert patterned
    assert all(Scorer(s)(s.refs[0]).instruction == 0.0 for s in patterned)


def test_baseline_outputs_are_what_their_names_say(samples):
    s = samples[5]
    assert baseline_output("copy_first", samples, 5) is s.refs[0]
    assert baseline_output("copy_last", samples, 5) is s.refs[-1]
    assert baseline_output("other_target", samples, 5) is samples[6].target
    grey = baseline_output("grey", samples, 5)
    assert grey.size == s.target.size and grey.getextrema() == ((128, 128),) * 3
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_output("nothing", samples, 0)


def test_a_failed_sample_names_the_reference_it_lost(samples, baselines):
    records = [r for r in baselines["copy_first"].records if r.k >= 2]
    assert records and all(r.failed for r in records)
    for r in records:
        roles = r.roles
        if roles[0] == "background":  # picture 1 returned: the background is kept, an object is lost
            assert r.lost_reference is not None and r.lost_reference > 1 and r.lost_role != "background"
    grey = baselines["grey"].records
    assert any(r.lost_reference is not None for r in grey)
    lost = [r.to_json()["lost_reference"] for r in grey]
    assert all(x is None or 1 <= x <= r.k for x, r in zip(lost, grey, strict=True))
    assert "## Lost references" in baselines["grey"].to_markdown()
