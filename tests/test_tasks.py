import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref.budget import Size
from uniref.data.scenes import Scene, render
from uniref.data.tasks import (
    COMPOSE_TASKS,
    DRILL_TASKS,
    EDIT_TASKS,
    MIN_REFS,
    ORDINALS,
    SizeRange,
    TaskConfig,
    generate,
    parse_tasks,
    render_spec,
)
from uniref.data.vocab import VOCABULARY, tokenize_words, unknown_words

ALL = TaskConfig(max_refs=6)


def _same(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_sample_is_a_pure_function_of_its_seed():
    a, b = generate(123, ALL), generate(123, ALL)
    assert a.instruction == b.instruction and a.spec == b.spec
    assert _same(a.target, b.target) and all(_same(x, y) for x, y in zip(a.refs, b.refs, strict=True))
    assert generate(124, ALL).spec != a.spec


@pytest.mark.parametrize("task", EDIT_TASKS + COMPOSE_TASKS)
def test_every_task_generates_with_its_k_range(task):
    cfg = TaskConfig(tasks=(task,), max_refs=5)
    ks = set()
    for seed in range(8):
        s = generate(seed, cfg)
        assert s.task == task and s.instruction
        assert MIN_REFS[task] <= s.k <= 5
        assert len(s.spec["refs"]) == s.k and all(r["contributes"] for r in s.spec["refs"]) or task == "background"
        ks.add(s.k)
    if task in EDIT_TASKS:
        assert ks == {1}


def _mentioned(text: str) -> set[int]:
    """0-based picture indices an instruction names, through any paraphrase."""
    found = {int(n) - 1 for n in re.findall(r"(?:picture|image) (\d+)", text)}
    return found | {ORDINALS.index(w) for w in re.findall(r"the (\w+) (?:picture|image)", text) if w in ORDINALS}


def test_compositions_name_and_use_every_reference():
    for seed in range(30):
        s = generate(seed, TaskConfig(tasks=COMPOSE_TASKS, max_refs=10))
        for i, ref in enumerate(s.spec["refs"]):
            assert ref["contributes"], f"picture {i + 1} contributes nothing"
            assert i in _mentioned(s.instruction), s.instruction


def test_pick_drill_targets_the_named_pictures_background_without_its_objects():
    ks, named_at = set(), set()
    for seed in range(40):
        s = generate(seed, TaskConfig(tasks=("pick",), max_refs=6))
        (named,) = _mentioned(s.instruction)
        assert unknown_words(s.instruction) == [] and "background" in s.instruction
        refs = s.spec["refs"]
        assert [bool(r["contributes"]) for r in refs] == [i == named for i in range(len(refs))]
        assert all(Scene.from_json(r["scene"]).objects for r in refs), "a picture without objects gives it away"
        picked = Scene.from_json(refs[named]["scene"])
        assert s.target.size == s.refs[named].size
        assert _same(s.target, render(Scene(picked.background, ()), Size(*s.target.size)))
        assert s.spec["checks"] == [{"kind": "background"}] and s.spec["objects"] == []
        ks.add(s.k)
        named_at.add(named)
    assert ks == {2, 3, 4, 5, 6} and named_at == set(range(6))


def test_the_drill_is_in_no_family_so_evaluation_sets_do_not_change():
    assert all(t not in parse_tasks("edit,compose") for t in DRILL_TASKS)
    assert "pick" not in TaskConfig().tasks


def test_references_have_different_sizes_within_the_range():
    sr = SizeRange(40, 120)
    sizes = set()
    for seed in range(10):
        s = generate(seed, TaskConfig(tasks=("compose",), max_refs=4, size_range=sr))
        for r in s.refs:
            assert 40 <= max(r.size) <= 120 and min(r.size) >= 40
            sizes.add(r.size)
    assert len(sizes) > 10


def test_target_objects_have_distinct_colours():
    for seed in range(40):
        s = generate(seed, TaskConfig(max_refs=10))
        colours = [o["colour"] for o in s.spec["target"]["scene"]["objects"]]
        assert len(colours) == len(set(colours))


def test_spec_rerenders_the_target_exactly():
    for seed in range(5):
        s = generate(seed, ALL)
        again = render_spec(json.loads(json.dumps(s.spec)))
        assert _same(again.target, s.target)
        assert all(_same(a, b) for a, b in zip(again.refs, s.refs, strict=True))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**40), max_refs=st.integers(1, 10))
def test_any_seed_gives_a_valid_json_spec_and_in_vocabulary_instruction(seed, max_refs):
    s = generate(seed, TaskConfig(max_refs=max_refs))
    assert json.loads(json.dumps(s.spec)) == s.spec
    assert unknown_words(s.instruction) == []
    assert s.target.size == (s.spec["target"]["width"], s.spec["target"]["height"])


def test_vocabulary_is_small_unique_lower_case():
    assert len(VOCABULARY) == len(set(VOCABULARY)) < 200
    assert all(w == w.lower() and tokenize_words(w) == [w] for w in VOCABULARY)
    assert tokenize_words("Put the RED circle from picture 10, then...") == [
        "put", "the", "red", "circle", "from", "picture", "10", "then"
    ]  # fmt: skip


def test_task_families_expand_and_unknown_task_is_an_error():
    assert parse_tasks("edit") == EDIT_TASKS
    assert parse_tasks("compose,recolour") == COMPOSE_TASKS + ("recolour",)
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("explode")


def test_size_range_parses_and_rejects_bad_text():
    assert SizeRange.parse("48:160") == SizeRange(48, 160)
    assert SizeRange.parse("64") == SizeRange(64, 64)
    with pytest.raises(ValueError):
        SizeRange.parse("big")
    assert Size(1, 2).width == 1
