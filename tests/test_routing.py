import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_sft import _config
from uniref.data import TaskConfig, generate, parse_tasks
from uniref.data.scenes import SceneObject
from uniref.errors import ConfigError
from uniref.eval import evaluate
from uniref.models.tiny import TinyConfig, build_tiny
from uniref.sequence import attention_mask
from uniref.train.batch import flow_loss, make_batch
from uniref.train.routing import (
    BACKGROUND_QUERIES,
    PackedRoutes,
    Route,
    object_token_mask,
    pack_routes,
    routing_loss,
    sample_routes,
)
from uniref.train.sft import train_sft

SMALL = TinyConfig(width=32, depth=3, heads=2, rope_axes=(4, 6, 6), text_layers=1, mlp_ratio=2.0)


def _samples(task: str, n: int, max_refs: int = 4, start: int = 0) -> list:
    return [generate(start + i, TaskConfig(parse_tasks(task), max_refs)) for i in range(n)]


def _grid(size: tuple[int, int], cell: int = 8) -> tuple[int, int]:
    return size[1] // cell, size[0] // cell


def _centre_token(obj: SceneObject, width: int, height: int, grid: tuple[int, int]) -> int:
    return int(obj.cy * grid[0]) * grid[1] + int(obj.cx * grid[1])


def test_routes_link_each_placed_object_to_its_source_object_in_its_reference() -> None:
    samples = [s for s in _samples("compose", 12) if s.k >= 3]
    assert samples
    for s in samples:
        grids = [_grid(s.target.size)] + [_grid(r.size) for r in s.refs]
        routes = sample_routes(s.spec, grids)
        placed = s.spec["target"]["scene"]["objects"]
        object_refs = [
            (i, part["object"])
            for i, r in enumerate(s.spec["refs"])
            for part in r["contributes"]
            if part["what"] == "object"
        ]
        assert [(r.ref, None) for r in routes] == [(i, None) for i, _ in object_refs]
        for route, (i, j) in zip(routes, object_refs, strict=True):
            target_obj = SceneObject(**placed[j])
            t = s.spec["target"]
            assert _centre_token(target_obj, t["width"], t["height"], grids[0]) in route.target_tokens.tolist()
            ref = s.spec["refs"][i]
            source = [SceneObject(**o) for o in ref["scene"]["objects"] if o["shape"] == placed[j]["shape"]]
            assert len(source) == 1  # distractors never share the placed object's shape
            assert _centre_token(source[0], ref["width"], ref["height"], grids[i + 1]) in route.ref_tokens.tolist()
            assert route.ref_tokens.max() < grids[i + 1][0] * grids[i + 1][1]


def test_donors_and_specless_samples_give_no_route() -> None:
    transfer = _samples("transfer", 8, max_refs=4)
    for s in transfer:
        grids = [_grid(s.target.size)] + [_grid(r.size) for r in s.refs]
        donors = [i for i, r in enumerate(s.spec["refs"]) if r["contributes"][0]["what"] in ("colour", "pattern")]
        assert donors and all(r.ref not in donors for r in sample_routes(s.spec, grids))
    assert sample_routes({}, [(4, 4), (4, 4)]) == []
    assert object_token_mask({}, (4, 4)) is None


def test_background_routes_send_free_target_tokens_to_the_background_picture() -> None:
    samples = _samples("compose", 10, max_refs=5)
    for s in samples:
        grids = [_grid(s.target.size)] + [_grid(r.size) for r in s.refs]
        routes = sample_routes(s.spec, grids, background=True)
        objects = [(r.ref, r.target_tokens.tolist(), r.ref_tokens.tolist()) for r in routes if not r.background]
        assert objects == [
            (r.ref, r.target_tokens.tolist(), r.ref_tokens.tolist()) for r in sample_routes(s.spec, grids)
        ]
        background = [r for r in routes if r.background]
        bg_refs = [i for i, r in enumerate(s.spec["refs"]) if r["contributes"][0]["what"] == "background"]
        assert [r.ref for r in background] == bg_refs and len(bg_refs) == 1
        route = background[0]
        covered = object_token_mask(s.spec, grids[0])
        assert covered is not None and not covered[route.target_tokens].any()
        assert 0 < len(route.target_tokens) <= BACKGROUND_QUERIES
        assert len(set(route.target_tokens.tolist())) == len(route.target_tokens)
        h, w = grids[route.ref + 1]
        assert route.ref_tokens.tolist() == list(range(h * w))
    # With one reference every reference key is the background's: there is nothing to route.
    for s in _samples("edit", 6):
        grids = [_grid(s.target.size), _grid(s.refs[0].size)]
        assert not any(r.background for r in sample_routes(s.spec, grids, background=True))


def test_object_mask_covers_every_target_object_and_little_else() -> None:
    s = _samples("edit", 1, start=3)[0]
    grid = _grid(s.target.size)
    mask = object_token_mask(s.spec, grid)
    assert mask is not None and mask.shape == (grid[0] * grid[1],)
    t = s.spec["target"]
    for o in t["scene"]["objects"]:
        assert mask[_centre_token(SceneObject(**o), t["width"], t["height"], grid)]
    assert 0 < mask.float().mean() < 0.8


def test_routing_loss_is_minus_log_of_the_share_given_to_the_source() -> None:
    # One row: text (1 token), target (2 tokens), a reference of 4 keys; query = target token 0.
    length, dim = 7, 4
    q = torch.zeros(1, 2, length, dim)
    k = torch.zeros(1, 2, length, dim)
    mask = attention_mask(torch.zeros(1, length, dtype=torch.long))
    good = torch.zeros(1, 1, length, dtype=torch.bool)
    good[0, 0, 3] = True
    refs = torch.zeros(1, 1, length, dtype=torch.bool)
    refs[0, 0, 3:] = True
    routes = PackedRoutes(torch.tensor([[1]]), torch.tensor([[True]]), good, refs)
    # Equal logits: the share is 1 of 4 reference keys whatever the other keys take.
    assert float(routing_loss(q, k, mask, routes)) == pytest.approx(math.log(4), abs=1e-4)
    # Head 0 fetches the source key hard, head 1 stays uniform: the mean share is (1 + 1/4) / 2.
    q[0, 0, 1, 0], k[0, 0, 3, 0] = 30.0, 30.0
    assert float(routing_loss(q, k, mask, routes)) == pytest.approx(-math.log(0.625), abs=1e-3)


def test_object_and_background_queries_are_averaged_apart_and_added() -> None:
    # Text (1), target (3), one reference of 4 keys; queries: target tokens 0, 1 (object) and 2 (background).
    length, dim = 8, 4
    q, k = torch.zeros(1, 1, length, dim), torch.zeros(1, 1, length, dim)
    mask = attention_mask(torch.zeros(1, length, dtype=torch.long))
    refs = torch.zeros(1, 3, length, dtype=torch.bool)
    refs[0, :, 4:] = True
    good = torch.zeros(1, 3, length, dtype=torch.bool)
    good[0, 0, 4] = good[0, 1, 4] = True  # the objects' source: one key of 4
    good[0, 2, 4:6] = True  # the background: two keys of 4
    queries, valid = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    kinds = torch.tensor([[False, False, True]])
    both = float(routing_loss(q, k, mask, PackedRoutes(queries, valid, good, refs, kinds)))
    assert both == pytest.approx(math.log(4) + math.log(2), abs=1e-4)
    # Without kinds every query counts once in one mean, as before background routes existed.
    pooled = float(routing_loss(q, k, mask, PackedRoutes(queries, valid, good, refs)))
    assert pooled == pytest.approx((2 * math.log(4) + math.log(2)) / 3, abs=1e-4)
    only_objects = PackedRoutes(queries, valid, good, refs, torch.zeros(1, 3, dtype=torch.bool))
    assert float(routing_loss(q, k, mask, only_objects)) == pytest.approx(pooled, abs=1e-4)


def test_pack_routes_points_at_the_right_samples_tokens() -> None:
    routes = [[Route(torch.tensor([0, 1]), 1, torch.tensor([2]))], [], [Route(torch.tensor([3]), 0, torch.tensor([0]))]]
    grids = [[(1, 2), (1, 1), (1, 3)], [(1, 1), (1, 1)], [(2, 2), (1, 2)]]
    spans = [(0, 0, 6), (0, 6, 2), (1, 0, 6)]
    packed = pack_routes(routes, spans, grids, text_len=5, row_len=11, rows=2)
    assert packed is not None
    assert packed.queries.tolist() == [[5, 6], [8, 0]] and packed.valid.tolist() == [[True, True], [True, False]]
    # Sample 0's reference 2 (1x3 grid) starts after the target (2) and reference 1 (1): token 2 -> 5 + 5.
    assert torch.nonzero(packed.good[0, 0])[:, 0].tolist() == [10]
    assert torch.nonzero(packed.refs[0, 0])[:, 0].tolist() == [7, 8, 9, 10]
    assert torch.nonzero(packed.good[1, 0])[:, 0].tolist() == [9]  # sample 2: target 4 tokens, then ref 1
    assert packed.background is not None and not packed.background.any()
    flagged = [[Route(torch.tensor([0]), 0, torch.tensor([0, 1]), background=True)]]
    packed = pack_routes(flagged, spans[:1], grids[:1], text_len=5, row_len=11, rows=1)
    assert packed is not None and packed.background is not None and packed.background.tolist() == [[True]]
    assert pack_routes([[], []], spans[:2], grids[:2], 5, 11, 1) is None


def _batch(model, seed: int = 0) -> tuple:
    samples = _samples("compose", 4, max_refs=3, start=seed)
    batch = make_batch(model, samples, 48 * 48, 48 * 48, list(range(len(samples))))
    return batch, model.encode_condition(batch.instructions, batch.refs, batch.ref_sizes)


def test_routing_and_object_weight_off_give_the_plain_loss_and_on_train_the_attention() -> None:
    model = build_tiny(SMALL, seed=1)
    batch, cond = _batch(model)
    plain = flow_loss(model, batch, cond, "x0")
    assert plain.routing is None
    errors = []
    v_hat = batch.packed.target_tokens(model.velocity(batch.packed, cond, batch.sigma))
    for vh, vt in zip(v_hat, batch.target_v, strict=True):
        errors.append((vh - vt).pow(2).mean())
    expected = (torch.stack(errors) * batch.sigma**2).mean()
    assert torch.allclose(plain.total, expected, atol=1e-6)

    weighted = flow_loss(model, batch, cond, "x0", object_weight=3.0)
    assert not torch.allclose(weighted.total, plain.total)

    routed = flow_loss(model, batch, cond, "x0", routing=1.0)
    assert routed.routing is not None and float(routed.routing) > 0
    assert torch.allclose(routed.total, plain.total + routed.routing, atol=1e-5)
    with_background = flow_loss(model, batch, cond, "x0", routing=1.0, route_background=True)
    assert with_background.routing is not None and float(with_background.routing) > float(routed.routing)
    # The routing term reaches the attention's queries and keys, never the output head.
    weights = [model.net.blocks[1].img.qkv.weight, model.net.out.weight]
    with_routing = torch.autograd.grad(routed.total, weights)
    without = torch.autograd.grad(flow_loss(model, batch, cond, "x0").total, weights)
    assert not torch.allclose(with_routing[0], without[0])
    assert torch.allclose(with_routing[1], without[1], atol=1e-7)
    assert all(block.on_attention is None for block in model.net.blocks)  # the hook is removed after use


def test_a_few_steps_of_the_routing_loss_raise_the_share(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_tiny(SMALL, seed=2)
    model.net.train()
    batch, cond = _batch(model, seed=10)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=3e-3)
    shares = []
    for _ in range(25):
        parts = flow_loss(model, batch, cond, "x0", routing=1.0)
        shares.append(float(np.exp(-float(parts.routing))))
        optimiser.zero_grad()
        parts.total.backward()
        optimiser.step()
    assert shares[-1] > 1.5 * shares[0]


def test_routing_needs_an_adapter_that_exposes_its_attention() -> None:
    model = build_tiny(SMALL, seed=1)
    batch, cond = _batch(model)

    class Opaque:
        spec = model.spec

        def velocity(self, *args):
            return model.velocity(*args)

    with pytest.raises(ConfigError, match="does not expose its attention"):
        flow_loss(Opaque(), batch, cond, routing=0.5)  # type: ignore[arg-type]


def test_sft_with_routing_logs_the_routing_loss_and_resumes_the_same(tmp_path: Path) -> None:
    extra = [
        "model.tiny={width: 32, depth: 2, heads: 2, rope_axes: [4, 6, 6], text_layers: 1, mlp_ratio: 2}",
        "data.task_mix={compose: 1.0}",
        "loss.routing=0.2",
        "loss.route_background=true",
        "loss.object_weight=2.0",
    ]
    straight = train_sft(_config(tmp_path / "a", *extra, "train.max_steps=4"))
    train_sft(_config(tmp_path / "b", *extra, "train.max_steps=2"))
    resumed = train_sft(_config(tmp_path / "b", *extra, "train.max_steps=4"))
    assert resumed.losses == straight.losses[2:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/routing"] > 0 for r in rows)


def test_routing_diagnostics_reports_share_scores_and_overall(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import routing_diagnostics

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    routing_diagnostics.main([str(folder), "--n", "2", "--budget", "48", "--max-refs", "2", "--edits", "add"])
    out = capsys.readouterr().out
    share = float(out.split("  routing share ")[1].split()[0])
    uniform = float(out.split("(uniform ")[1].split(")")[0])
    assert 0 < share <= 1 and 0 < uniform <= 1
    bg_share = float(out.split("background routing share ")[1].split()[0])
    bg_uniform = float(out.split("background routing share ")[1].split("(uniform ")[1].split(")")[0])
    assert 0 < bg_share <= 1 and 0 < bg_uniform < 1
    assert "placed objects: iou" in out and "objects drawn by `add`: iou" in out
    assert "compositions" in out and "(n=2)" in out and "(n=1)" in out
    assert "colour in the words: " in out and "reference/output diameter: " in out
    # Every placed object (two samples of K = 2: one each) and the add's object fall in one aspect group.
    aspect = out.split("\n  output aspect: ")[1].split("\n")[0]
    assert sum(int(cell.split("(n=")[1].split(")")[0]) for cell in aspect.split("; ")) == 2
    assert "`add`: output aspect: " in out
    assert "x0 error as a fraction of the latent mean's, object / background tokens: sigma 1.0: " in out


def test_placed_object_facts_name_the_colour_and_the_copy_scale() -> None:
    from benchmarks.routing_diagnostics import placed_object_facts

    samples = [s for s in _samples("compose", 12, max_refs=3)]
    for s in samples:
        facts = placed_object_facts(s, 128)
        objects = s.spec["target"]["scene"]["objects"]
        assert len(facts) == len(objects)
        for (named, ratio), obj in zip(facts, objects, strict=True):
            assert named == (obj["colour"] in s.instruction.split())
            # Reference objects are 0.30-0.55 of their picture's short side, placed ones 0.28 (or 0.5
            # in conflicts) of the output's; pictures are shrunk to share the budget.
            assert 0.05 < ratio < 5
    assert {n for s in samples for n, _ in placed_object_facts(s, 128)} == {True, False}


def test_x0_error_split_is_one_for_the_latent_mean_and_zero_for_the_truth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import routing_diagnostics

    folder = build_tiny(SMALL, seed=3).save(tmp_path / "model")
    samples = _samples("compose", 4, max_refs=2)
    model = build_tiny(SMALL, seed=3)
    monkeypatch.setattr(routing_diagnostics, "load_tiny_folder", lambda _: model)
    monkeypatch.setattr(model, "predict_x0", lambda batch, cond, sigma: torch.zeros_like(batch.tokens.values))
    obj, bg, tokens, part = routing_diagnostics.x0_error_split(folder, samples, 48, [1.0])[0]
    assert obj == pytest.approx(1.0) and bg == pytest.approx(1.0) and 0 < tokens < 1 and 0 < part < 1

    def truth(batch, cond, sigma):  # every target token's clean value, read back from x_t = x_0 + σ·v
        out = batch.tokens.values.clone()
        for i, (row, start, _) in enumerate(batch.tokens.spans):
            n = truth.velocities[i].shape[0]
            out[row, start : start + n] -= float(sigma[i]) * truth.velocities[i]
        return out

    real_make_batch = routing_diagnostics.make_batch

    def spy(*args, **kwargs):
        batch = real_make_batch(*args, **kwargs)
        truth.velocities = batch.target_v
        return batch

    monkeypatch.setattr(routing_diagnostics, "make_batch", spy)
    monkeypatch.setattr(model, "predict_x0", truth)
    obj, bg, _, _ = routing_diagnostics.x0_error_split(folder, samples, 48, [0.7])[0]
    assert obj == pytest.approx(0.0, abs=1e-9) and bg == pytest.approx(0.0, abs=1e-9)


def test_reference_reading_reports_shares_and_budgets_by_k(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import reference_reading

    folder = build_tiny(SMALL, seed=4).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    reference_reading.main(["shares", str(folder), "--n", "3", "--budget", "48", "--max-refs", "3"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {folder} |")]
    groups = {
        s.k
        for s in reference_reading.split_samples(
            "val",
            3,
            reference_reading.TaskConfig(
                reference_reading.parse_tasks("compose"), 3, reference_reading.SizeRange(48, 160)
            ),
        )
    }
    assert len(rows) == len(groups)
    for row in rows:
        obj, obj_uniform, bg, bg_uniform = (float(c) for c in row.strip("|").split("|")[3:7])
        assert 0 < obj <= 1 and 0 < obj_uniform <= 1 and 0 < bg <= 1 and 0 < bg_uniform < 1
    reference_reading.main(["budgets", str(folder), "--n", "3", "--budgets", "32,48", "--max-refs", "3"])
    out = capsys.readouterr().out
    budget_rows = [r for r in out.splitlines() if r.startswith("| 32² |") or r.startswith("| 48² |")]
    assert len(budget_rows) == 2
    assert all(0 <= float(r.split("|")[2]) <= 1 for r in budget_rows)
    reference_reading.main(["budgets", str(folder), "--n", "2", "--budgets", "48", "--tasks", "edit"])
    edit_out = capsys.readouterr().out
    assert "| K = 1 |" in edit_out and "(n = 2)" in edit_out and "K = 2" not in edit_out


def test_reference_reading_scales_grow_with_the_reference_budget_only(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import reference_reading

    samples = reference_reading.split_samples(
        "val",
        4,
        reference_reading.TaskConfig(reference_reading.parse_tasks("compose"), 4, reference_reading.SizeRange(48, 160)),
    )
    for sample in samples:
        small = reference_reading.object_widths(sample, 64, 128, 8)
        large = reference_reading.object_widths(sample, 128, 128, 8)
        placed = [c for r in sample.spec["refs"] for c in r["contributes"] if c["what"] == "object"]
        assert len(small) == len(large) == len(placed) > 0
        for (src_small, out_small), (src_large, out_large) in zip(small, large, strict=True):
            assert out_small == out_large > 0  # the output does not depend on the reference budget
            assert src_large > src_small > 0  # twice the side: about twice as wide, up to rounding
            assert src_large / src_small == pytest.approx(2.0, rel=0.25)
    reference_reading.main(["scales", "--n", "4", "--max-refs", "4", "--budgets", "64,128"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 64² |") or r.startswith("| 128² |")]
    assert len(rows) == 2 * len(reference_reading.by_k(samples))
    with pytest.raises(SystemExit):
        reference_reading.main(["scales", "tiny"])


def test_reference_reading_order_scores_every_named_object_and_the_background(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from types import SimpleNamespace

    from benchmarks import reference_reading

    samples = reference_reading.split_samples(
        "val",
        6,
        reference_reading.TaskConfig(reference_reading.parse_tasks("compose"), 4, reference_reading.SizeRange(48, 160)),
    )

    class Returns:  # a pipeline that answers every sample with a fixed choice of picture
        def __init__(self, pick) -> None:
            self.pick, self.seen = pick, 0

        def generate(self, instructions, refs, **_) -> SimpleNamespace:
            images = [self.pick(samples[self.seen + i]) for i in range(len(instructions))]
            self.seen += len(instructions)
            return SimpleNamespace(images=images)

    truth_report = evaluate(Returns(lambda s: s.target), samples, progress=False)
    truth_taken = reference_reading.named_taken(truth_report, samples, [s.target for s in samples])
    truth = reference_reading.order_rows("truth", truth_report, truth_taken)
    assert {r.split("|")[2].strip() for r in truth} == {f"K = {s.k}" for s in samples}
    for row in truth:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c in ("1.000", "–") for c in cells[3:7]) and cells[7] == "1.00" and cells[8] == "1.00"
    copied = [s.refs[0] for s in samples]
    copy_report = evaluate(Returns(lambda s: s.refs[0]), samples, progress=False)
    copy_taken = reference_reading.named_taken(copy_report, samples, copied)
    copy = reference_reading.order_rows("copy", copy_report, copy_taken)
    assert all(float(r.strip("|").split("|")[3]) < 1 for r in copy)
    # The named background picture returned as the output: its background is the named one's.
    for sample in samples:
        named = next(i for i, r in enumerate(sample.spec["refs"]) if r["contributes"][0]["what"] == "background")
        assert reference_reading.takes_named_background(sample, sample.refs[named], named)
        others = [r for i, r in enumerate(sample.refs) if i != named]
        assert not all(reference_reading.takes_named_background(sample, r, named) for r in others)
    # From the command line: the model's rows, then the trivial baselines' on the same samples.
    folder = build_tiny(SMALL, seed=4).save(tmp_path / "model", target_budget=48 * 48, ref_budget=48 * 48)
    reference_reading.main(["order", str(folder), "--n", "3", "--max-refs", "3"])
    out = capsys.readouterr().out
    assert f"| {folder} | K = " in out and "| *baseline: copy_first* | K = " in out and "| *baseline: grey* |" in out
    assert "| picture 1 named | picture 2 named | picture 3 named |" in out
    # By named picture: the truth takes it every time, in cells that count every sample once.
    by_named = reference_reading.named_index_rows("truth", truth_report, truth_taken, 4)
    counted = 0
    for row in by_named:
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert len(cells) == 4 and all(c == "–" or c.startswith("1.00 (") for c in cells)
        counted += sum(int(c.split("(")[1].rstrip(")")) for c in cells if c != "–")
    assert counted == len(samples)
    # By how objects are named: the truth scores 1 whichever way, and every placed object is counted once.
    naming = reference_reading.naming_rows("truth", truth_report, samples)
    placed = sum(len(s.spec["objects"]) for s in samples)
    seen = 0
    for row in naming:
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert all(c == "–" or c.startswith("1.000 (") for c in cells)
        seen += sum(int(c.split("(")[1].rstrip(")")) for c in cells if c != "–")
    assert seen == placed


def test_object_phrases_read_each_placed_objects_description_in_order() -> None:
    from benchmarks.reference_reading import object_phrases

    text = (
        "arrange the object from the first image at the top and the red star from image 3 at the bottom "
        "onto the background of image 2, then give the star from image 3 the colour of the ring in picture 4"
    )
    assert object_phrases(text, 2) == ["object", "red star"]  # the recipient named after them is not one
    with pytest.raises(ValueError, match="expected 2"):
        object_phrases("put the red star from picture 2 on the left on the background of picture 1", 2)
