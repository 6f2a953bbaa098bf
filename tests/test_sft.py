import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uniref.config import load_config
from uniref.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from uniref.train.config import SFTConfig
from uniref.train.sft import train_sft

TINY = [
    "model.name=tiny-random",
    "model.tiny={width: 32, depth: 1, heads: 2, rope_axes: [4, 6, 6], text_layers: 1, mlp_ratio: 2}",
    "data.max_refs=3",
    "data.size_range='32:64'",
    "stages=[{budget: 32, steps: 4, batch_size: 4}, {budget: 48, steps: 4, batch_size: 4, warmup_steps: 2}]",
    "optim.warmup_steps=2",
    "optim.ema_decay=0.9",
    "loss.weighting=x0",
    "log.log_every=1",
    "log.checkpoint_every=2",
    "log.keep_last=2",
    "log.tensorboard=false",
    "log.progress=false",
    "data.workers=0",
    "log.val_samples=0",
    "log.preview_every=1000",
]


def _config(out: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, overrides=[*TINY, f"run.output_dir={out}", *extra])


def test_resume_reproduces_the_uninterrupted_loss_curve_bit_for_bit(tmp_path: Path) -> None:
    straight = train_sft(_config(tmp_path / "a", "train.max_steps=6"))
    first = train_sft(_config(tmp_path / "b", "train.max_steps=3"))
    second = train_sft(_config(tmp_path / "b", "train.max_steps=6"))
    assert len(straight.losses) == 6 and len(first.losses) == 3 and len(second.losses) == 3
    assert first.losses + second.losses == straight.losses  # exact float equality, stage change included
    wa, ea, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    wb, eb, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoints_are_complete_pruned_and_leave_no_temp_folders(tmp_path: Path) -> None:
    summary = train_sft(_config(tmp_path, "train.max_steps=6"))
    assert summary.steps == 6
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000004", "step_00000006"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    _, ema, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert ema is not None and state["step"] == 6
    assert {"optimizer", "scheduler", "rng", "trainer", "skipped_nonfinite"} <= set(state)
    saved = load_config(SFTConfig, tmp_path / "config.yaml")
    assert saved.train.max_steps == 6 and saved.run.output_dir == tmp_path


def test_the_checkpoint_that_ends_each_stage_is_written_and_never_pruned(tmp_path: Path) -> None:
    stages = "stages=[{budget: 32, steps: 3, batch_size: 4}, {budget: 48, steps: 5, batch_size: 4}]"
    train_sft(_config(tmp_path, stages, "log.keep_last=1", "train.max_steps=8"))
    # Step 3 ends stage 1 off the every-2 rhythm; keep_last=1 keeps only the newest of the rest.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000008"]
    _, _, state = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert state["step"] == 3


def test_metrics_log_loss_by_task_and_k_and_packing(tmp_path: Path) -> None:
    train_sft(_config(tmp_path, "train.max_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    keys = set(rows[0])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "real_token_fraction", "stage", "budget"} <= keys
    assert any(k.startswith("loss/task/") for k in keys) and any(k.startswith("loss/k/") for k in keys)
    assert 0 < rows[0]["real_token_fraction"] <= 1


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uniref.train.sft as sft

    real = sft.flow_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(sft, "flow_loss", sometimes_nan)
    summary = train_sft(_config(tmp_path, "train.max_steps=3"))
    assert summary.skipped_nonfinite == 1 and summary.steps == 3
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_worker_prefetch_gives_the_same_samples_as_inline(tmp_path: Path) -> None:
    inline = train_sft(_config(tmp_path / "a", "train.max_steps=3"))
    ahead = train_sft(_config(tmp_path / "b", "train.max_steps=3", "data.workers=1"))
    assert inline.losses == ahead.losses


def test_encoding_in_the_workers_trains_as_encoding_inline(tmp_path: Path) -> None:
    # Stages of different budgets: the worker must find each step's stage from the sample indices.
    inline = train_sft(_config(tmp_path / "a", "train.max_steps=8"))
    moved = train_sft(_config(tmp_path / "b", "train.max_steps=8", "data.workers=1", "data.encode_in_workers=true"))
    torch.testing.assert_close(torch.tensor(moved.losses), torch.tensor(inline.losses), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_and_save_the_same_keys(tmp_path: Path) -> None:
    # Two budgets: the compiled blocks must follow a change of sequence length (dynamic shapes).
    eager = train_sft(_config(tmp_path / "a", "train.max_steps=6"))
    compiled = train_sft(_config(tmp_path / "b", "train.max_steps=6", "model.compile=true"))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-3, atol=1e-5)
    wa, ea, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    wb, eb, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert wa.keys() == wb.keys() and ea.keys() == eb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4)


def test_step_of_an_index_inverts_the_step_batches() -> None:
    from uniref.train.data import StepBatches

    batches = StepBatches(lambda step: 4 if step < 3 else 8, 0, 10, 0, 1)
    for step in range(10):
        first = batches.first_index(step)
        size = 4 if step < 3 else 8
        assert batches.step_of(first) == step and batches.step_of(first + size - 1) == step


def test_step_batches_split_the_global_order_across_processes() -> None:
    from uniref.train.data import StepBatches

    sizes = lambda step: 4 if step < 2 else 6  # noqa: E731
    one = list(StepBatches(sizes, 0, 4, 0, 1))
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]
    r0, r1 = list(StepBatches(sizes, 0, 4, 0, 2)), list(StepBatches(sizes, 0, 4, 1, 2))
    assert [sorted(a + b) for a, b in zip(r0, r1, strict=True)] == one
    assert list(StepBatches(sizes, 2, 4, 0, 1)) == one[2:]


def test_stop_request_checkpoints_and_a_rerun_continues(tmp_path: Path) -> None:
    class StopAtTwo:
        def after_step(self, step: int, runtime) -> None:
            if step == 2:
                runtime.stop_requested = True

    summary = train_sft(_config(tmp_path, "train.max_steps=6"), hooks=StopAtTwo())
    assert summary.interrupted and summary.steps == 2
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    rest = train_sft(_config(tmp_path, "train.max_steps=6"))
    assert rest.steps == 6 and len(rest.losses) == 4


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group-with-worker"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, group: bool) -> None:
    # group: SIGTERM to the whole process group (as `timeout` and Slurm send it) reaches the data
    # worker too; the trainer must still checkpoint instead of dying of the worker's death.
    cmd = [sys.executable, "-m", "uniref", "train", "sft", "--config", "configs/tiny_sft.yaml"]
    cmd += [*TINY, f"run.output_dir={tmp_path}", "train.max_steps=100000", "log.checkpoint_every=100000"]
    cmd += [f"data.workers={int(group)}"]
    cmd[
        cmd.index(
            "stages=[{budget: 32, steps: 4, batch_size: 4}, {budget: 48, steps: 4, batch_size: 4, warmup_steps: 2}]"
        )
    ] = "stages=[{budget: 32, steps: 100000, batch_size: 2}]"
    root = Path(__file__).parent.parent
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted, checkpoint saved" in out
    assert latest_checkpoint(tmp_path) is not None


# Two processes reduce gradients in another order than one; after 3 AdamW steps the weights differ by
# float32 rounding only (measured ~1e-7); a missing or wrong all-reduce moves them by ~lr per step.
WEIGHT_TOLERANCE = 1e-5


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """DDP over gloo (2 CPU processes, 2 samples each) follows the single-process run (4 samples)."""
    root = Path(__file__).parent.parent
    args = ["train", "sft", "--config", "configs/tiny_sft.yaml", *TINY, "train.max_steps=3", "optim.ema_decay=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "uniref", *args, f"run.output_dir={tmp_path / 'one'}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "uniref",
            *args,
            f"run.output_dir={tmp_path / 'two'}",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def grad_norms(run: str) -> list[float]:
        return [json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
    # AdamW is blind to a constant gradient scale, so a gradient summed over processes instead of
    # averaged would leave the weights almost unchanged: the pre-clip norm is what tells them apart.
    for a, b in zip(grad_norms("one"), grad_norms("two"), strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
    # The weights every process ends with (rank 0 writes them) are the single process's.
    w_one, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    w_two, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    assert w_one.keys() == w_two.keys()
    worst = max((w_one[k].float() - w_two[k].float()).abs().max().item() for k in w_one)
    print(f"two processes vs one: max abs weight difference after 3 steps {worst:.2e}")
    assert worst <= WEIGHT_TOLERANCE


def test_previews_and_validation_use_held_out_samples_and_are_logged(tmp_path: Path) -> None:
    train_sft(
        _config(
            tmp_path,
            "train.max_steps=2",
            "log.preview_every=1",
            "log.val_every=2",
            "log.val_samples=3",
            "log.val_steps=1",
        )
    )
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    report = json.loads((tmp_path / "val" / "step_00000002.json").read_text())
    assert report["n"] == 3 and 0 <= report["worst_ref_consistency"] <= report["ref_consistency"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val/worst_ref_consistency" in r for r in rows)


@pytest.mark.slow
def test_sft_runs_the_qwen_image_edit_adapter_through_the_same_loop(tmp_path: Path) -> None:
    """One code path: LoRA SFT of a (tiny random) diffusers Qwen-Image-Edit folder, with resume."""
    import qwen_tiny  # our own test helper: a moved file must fail, not skip

    folder = qwen_tiny.save_folder(qwen_tiny.build_components(zero_cond_t=True), tmp_path / "qwen")
    overrides = [o for o in TINY if not o.startswith(("model.", "stages=", "loss."))] + [
        f"model.name={folder}",
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "model.lora.alpha=4",
        "stages=[{budget: 64, steps: 4, batch_size: 2}]",
        "optim.ema_decay=0",
    ]
    first = train_sft(_config(tmp_path / "run", "train.max_steps=1", *overrides))
    second = train_sft(_config(tmp_path / "run", "train.max_steps=2", *overrides))
    assert first.steps == 1 and second.steps == 2
    assert all(torch.isfinite(torch.tensor(first.losses + second.losses)))
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_ema_warms_up_instead_of_holding_on_to_the_random_init() -> None:
    from torch.optim.swa_utils import AveragedModel

    from uniref.train.runtime import ema_with_warmup

    net = torch.nn.Linear(3, 3)
    init = net.weight.detach().clone()
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    for _ in range(20):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update_parameters(net)
    moved = (ema.module.weight - init).mean().item()
    assert 15 < moved < 20  # a fixed 0.999 decay would have moved it by ~0.2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "configs/tiny_sft.yaml", "train.max_stepz=1"], "unknown key 'train.max_stepz'"),
        (["--config", "configs/nope.yaml"], "config file not found"),
        (["--config", "configs/tiny_sft.yaml", "optim.lr=fast"], "optim.lr"),
    ],
)
def test_train_cli_bad_config_is_one_line_exit_2(args: list[str], needle: str, capsys) -> None:
    from cli_helpers import run_cli

    for command in ("sft", "rl"):
        config_args = [a.replace("tiny_sft", "tiny_msgrpo") if command == "rl" else a for a in args]
        code, _, err = run_cli(["train", command, *config_args], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1


def test_stages_with_their_own_task_mix_and_k_draw_from_their_own_scenes() -> None:
    from uniref.train.data import StagedSource, build_staged_source

    config = SFTConfig.model_validate(
        {
            "data": {"task_mix": {"compose": 1.0}, "max_refs": 6},
            "stages": [
                {"budget": 64, "steps": 3, "batch_size": 4, "max_refs": 2},
                {"budget": 64, "steps": 2, "batch_size": 8, "task_mix": {"edit": 1.0}},
                {"budget": 96, "steps": 1, "batch_size": 4},
            ],
        }
    )
    source = build_staged_source(config.data, config.stages)
    assert isinstance(source, StagedSource)
    first = [source.sample(i) for i in range(12)]  # stage 0: 3 steps x 4 samples
    assert {s.k for s in first} == {2}
    assert all(source.sample(i).k == 1 for i in range(12, 28))  # stage 1: single edits
    assert max(source.sample(i).k for i in range(28, 60)) > 2  # stage 2 and after: the data section's K <= 6
    assert source.sample(5).instruction == first[5].instruction  # a pure function of the index
    plain = build_staged_source(config.data, [config.stages[2]])
    assert not isinstance(plain, StagedSource)


def test_a_task_mix_entry_can_cap_its_own_k_and_a_bad_cap_is_named() -> None:
    from uniref.errors import ConfigError
    from uniref.train.data import SceneSource

    source = SceneSource({"compose@2": 1.0, "compose": 1.0}, 6, "48:160")
    ks = [source.sample(i).k for i in range(80)]
    assert min(ks) == 2 and max(ks) > 3  # the capped entry gives K = 2, the other reaches past 3
    capped = SceneSource({"compose@2": 1.0}, 6, "48:160")
    assert {capped.sample(i).k for i in range(20)} == {2}
    for bad in ("compose@x", "compose@0"):
        with pytest.raises(ConfigError, match=f"task_mix key '{bad}'"):
            SceneSource({bad: 1.0}, 6, "48:160")


def test_param_lr_scale_puts_named_parameters_in_their_own_group_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    from uniref.errors import ConfigError
    from uniref.train.runtime import scaled_param_groups

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    groups = scaled_param_groups(net, 1e-3, {"1.": 10.0})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[0]["params"] == list(net[0].parameters()) and groups[1]["params"] == list(net[1].parameters())
    with pytest.raises(ConfigError, match="param_lr_scale.role_in: no trainable parameter"):
        scaled_param_groups(net, 1e-3, {"role_in": 10.0})
    scaled = "optim.param_lr_scale={out: 10.0}"
    straight = train_sft(_config(tmp_path / "a", "train.max_steps=4", scaled))
    train_sft(_config(tmp_path / "b", "train.max_steps=2", scaled))
    resumed = train_sft(_config(tmp_path / "b", "train.max_steps=4", scaled))
    assert resumed.losses == straight.losses[2:]
    plain = train_sft(_config(tmp_path / "c", "train.max_steps=4"))
    assert plain.losses[:1] == straight.losses[:1] and plain.losses[1:] != straight.losses[1:]
