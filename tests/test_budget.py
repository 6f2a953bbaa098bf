import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref.budget import Plan, PlanMode, Size, _best_size, min_budget_side, parse_budget, plan, plan_target
from uniref.errors import BudgetError

BUDGETS = [1024**2, 1536**2, 2048**2]

any_size = st.builds(Size, width=st.integers(1, 4096), height=st.integers(1, 4096))


@st.composite
def ordinary_size(draw: st.DrawFn) -> Size:
    """Photos and renders people edit: 1:3 to 3:1, shorter side 64 px or more."""
    aspect = draw(st.floats(1 / 3, 3))
    short = draw(st.integers(64, 3000))
    return Size(short, round(short / aspect)) if aspect < 1 else Size(round(short * aspect), short)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(any_size, min_size=1, max_size=16), budget=st.sampled_from(BUDGETS + [256**2, 512 * 384]))
def test_global_plan_never_exceeds_budget(sizes: list[Size], budget: int) -> None:
    result = plan(sizes, budget, 32)
    assert result.total_pixels <= budget
    for s in result.sizes:
        assert s.width >= 32 and s.height >= 32
        assert s.width % 32 == 0 and s.height % 32 == 0


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(ordinary_size(), min_size=1, max_size=10), budget=st.sampled_from(BUDGETS))
def test_global_plan_uses_at_least_85_percent_of_budget(sizes: list[Size], budget: int) -> None:
    # Not 90 %: rather than stretch an image more than a quarter rounding step, the planner leaves part of
    # the budget unused, which for one image of an awkward aspect costs up to ~10 % (next test). Over 30,000
    # random plans at these budgets the lowest use was 0.896 and the mean 0.99.
    assert plan(sizes, budget, 32).budget_use >= 0.85


def test_global_plan_keeps_the_aspect_of_a_single_awkward_image_over_filling_the_budget() -> None:
    # 64x182 at 1024²: 576x1632 keeps the aspect within 0.4 % for 89.6 % of the budget; 608x1696 would use
    # 98.3 % but stretch it by 1.9 %, more than the quarter rounding step the planner allows.
    (size,) = plan([Size(width=64, height=182)], 1024**2, 32).sizes
    assert size == Size(width=576, height=1632)
    assert abs(math.log(size.aspect / (64 / 182))) < math.log1p(32 / (4 * size.width))


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(ordinary_size(), min_size=1, max_size=10), budget=st.sampled_from(BUDGETS))
def test_global_plan_keeps_aspect_within_one_rounding_step(sizes: list[Size], budget: int) -> None:
    result = plan(sizes, budget, 32)
    for planned, orig in zip(result.sizes, result.originals, strict=True):
        # One multiple on the shorter side is the coarsest change rounding can force.
        allowed = math.log1p(32 / min(planned.width, planned.height))
        assert abs(math.log(planned.aspect / orig.aspect)) <= allowed


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(ordinary_size(), min_size=1, max_size=10))
def test_global_plan_tokens_stay_flat_in_k_while_per_image_grows(sizes: list[Size]) -> None:
    budget = 1024**2
    assert sum(plan(sizes, budget, 32).tokens()) <= budget // 256
    per_image = sum(plan(sizes, budget, 32, PlanMode.PER_IMAGE).tokens())
    assert per_image >= 0.85 * len(sizes) * budget // 256


def test_plan_error_names_k_budget_and_smallest_fitting_budget() -> None:
    with pytest.raises(BudgetError) as err:
        plan([Size(100, 100)] * 5, 64 * 64, 32)
    message = str(err.value)
    assert "5 images" in message and "4096 px" in message and "--budget 72" in message
    assert min_budget_side(5, 32) == 72
    assert plan([Size(100, 100)] * 5, 72 * 72, 32).total_pixels <= 72 * 72


def test_plan_rejects_zero_images_and_bad_sizes() -> None:
    with pytest.raises(BudgetError, match="K = 0"):
        plan([], 1024**2, 32)
    with pytest.raises(BudgetError, match="both sides must be positive"):
        plan([Size(0, 10)], 1024**2, 32)


@settings(max_examples=200, deadline=None)
@given(size=any_size, budget=st.sampled_from(BUDGETS + [384 * 384]))
def test_per_image_matches_diffusers_calculate_dimensions(size: Size, budget: int) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    width, height = calculate_dimensions(budget, size.width / size.height)
    if width == 0 or height == 0:
        with pytest.raises(BudgetError, match="rounds a side to 0"):
            plan([size], budget, 32, PlanMode.PER_IMAGE)
    else:
        assert plan([size], budget, 32, PlanMode.PER_IMAGE).sizes[0] == Size(width, height)


def test_global_round_reproduces_unipic3_rule_and_can_overshoot() -> None:
    sizes = [Size(300, 412), Size(412, 300), Size(500, 500)]
    budget = 1024**2
    ratio = math.sqrt(budget / sum(s.area for s in sizes))
    expected = [Size(round(s.width * ratio / 32) * 32, round(s.height * ratio / 32) * 32) for s in sizes]
    result = plan(sizes, budget, 32, PlanMode.GLOBAL_ROUND)
    assert list(result.sizes) == expected
    assert result.total_pixels > budget  # the overshoot the hard cap of `global` prevents
    assert plan(sizes, budget, 32).total_pixels <= budget


def test_global_round_reports_collapsed_reference() -> None:
    with pytest.raises(BudgetError, match="collapses"):
        plan([Size(4000, 4000), Size(20, 20)], 512**2, 32, PlanMode.GLOBAL_ROUND)
    assert plan([Size(4000, 4000), Size(20, 20)], 512**2, 32).sizes[1].width >= 32


def test_weights_give_a_reference_a_bigger_share() -> None:
    sizes = [Size(800, 600), Size(800, 600)]
    even = plan(sizes, 1024**2, 32)
    weighted = plan(sizes, 1024**2, 32, weights=[3.0, 1.0])
    # Equal images get equal sizes up to one multiple (the greedy fill may grow one of them).
    assert abs(even.sizes[0].width - even.sizes[1].width) <= 32
    assert abs(even.sizes[0].height - even.sizes[1].height) <= 32
    assert weighted.sizes[0].area > 2 * weighted.sizes[1].area
    assert weighted.total_pixels <= 1024**2


def test_max_upscale_never_enlarges_beyond_factor() -> None:
    result = plan([Size(100, 100), Size(64, 128)], 1024**2, 32, max_upscale=1.0)
    for planned, orig in zip(result.sizes, result.originals, strict=True):
        assert planned.area <= max(orig.area, 32 * 32)


def test_plan_target_from_size_like_and_default() -> None:
    assert plan_target(1024**2, 32, size=Size(1000, 700)) == Size(992, 672)
    like = plan_target(1024**2, 32, like=Size(1600, 900))
    assert like.area <= 1024**2 and abs(like.aspect / (16 / 9) - 1) < 0.03
    assert plan_target(1024**2, 32) == Size(1024, 1024)
    with pytest.raises(BudgetError):
        plan_target(1024**2, 32, size=Size(10, 700))


def test_parse_budget_side_or_wxh() -> None:
    assert parse_budget(1024) == 1024**2
    assert parse_budget("1536") == 1536**2
    assert parse_budget("1024x768") == 1024 * 768
    with pytest.raises(BudgetError, match="budget 'big'"):
        parse_budget("big")


def test_plan_reports_tokens_use_and_aspect_errors() -> None:
    result = plan([Size(1024, 1024)], 1024**2, 32)
    assert isinstance(result, Plan)
    assert result.sizes == (Size(1024, 1024),)
    assert result.tokens() == [4096] and result.tokens(8) == [16384]
    assert result.budget_use == 1.0 and result.aspect_errors() == [0.0]


@given(
    size=any_size,
    target_area=st.floats(min_value=1.0, max_value=4096.0**2, allow_nan=False),
    multiple=st.sampled_from([8, 16, 32]),
)
def test_best_size_is_the_first_cheapest_candidate_of_its_window(size: Size, target_area: float, multiple: int) -> None:
    # The documented rule, written plainly: of the 4 x 4 sides nearest the ideal ones, the size with
    # the least aspect error + 0.5 x area error (log scale), the first one on ties.
    def near(ideal: float) -> range:
        return range(max(1, math.floor(ideal) - 1), max(1, math.floor(ideal) + 2) + 1)

    def cost(c: Size) -> float:
        return abs(math.log(c.aspect / size.aspect)) + 0.5 * abs(math.log(c.area / target_area))

    ideal_w = math.sqrt(target_area * size.aspect) / multiple
    ideal_h = math.sqrt(target_area / size.aspect) / multiple
    cands = [Size(w * multiple, h * multiple) for w in near(ideal_w) for h in near(ideal_h)]
    assert _best_size(size, target_area, multiple) == min(cands, key=cost)
