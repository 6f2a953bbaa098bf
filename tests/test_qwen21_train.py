"""Qwen-Image-2.1 through the same training code as every flavour (tiny random components, fp32, CPU):
LoRA SFT with resume, one MSGRPO step, and a LoRA export that diffusers' ``QwenImage21Pipeline``
(its ``QwenImageLoraLoaderMixin``) loads with identical outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen21_tiny
from test_msgrpo import RL_TINY
from test_sft import TINY
from uniref.config import load_config
from uniref.errors import ConfigError
from uniref.pipeline import EditPipeline
from uniref.train.checkpoint import latest_checkpoint, load_checkpoint
from uniref.train.config import LoraSection, RLConfig, SFTConfig
from uniref.train.lora import DIFFUSERS_FILE, export_lora, inject_lora, lora_state_dict
from uniref.train.msgrpo import train_rl
from uniref.train.sft import train_sft

# 2.1 is single-stream: text, reference and target tokens share one attention per block, so the
# default targets' to_q/to_k/to_v/to_out.0 are all of its attention projections.
ATTENTION = {"to_q", "to_k", "to_v", "to_out.0"}
# LoRA sized for the tiny transformer (width 32); alpha = rank keeps the scale at 1.
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return qwen21_tiny.save_folder(qwen21_tiny.build_components(), tmp_path_factory.mktemp("qwen21"))


def _model_overrides(folder: Path) -> list[str]:
    return [f"model.name={folder}", *LORA]


def test_default_lora_targets_cover_every_attention_projection_of_qwen_image_21() -> None:
    net = qwen21_tiny.build_components()["transformer"]
    inject_lora(net, LoraSection(enabled=True, rank=2, alpha=2))
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in net.named_parameters() if ".lora_" in n}
    attention = {n for n, m in net.named_modules() if n.rsplit(".attn.", 1)[-1] in ATTENTION and ".attn." in n}
    assert attention and adapted == attention
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".lora_" not in n)


def test_lora_targets_that_match_nothing_are_a_config_error() -> None:
    net = qwen21_tiny.build_components()["transformer"]
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        inject_lora(net, LoraSection(enabled=True, rank=2, alpha=2, target_modules=["add_q_proj", "qkv"]))


def test_lora_sft_on_qwen_image_21_trains_only_adapters_and_resumes_exactly(folder: Path, tmp_path: Path) -> None:
    overrides = [o for o in TINY if not o.startswith(("model.", "stages=", "loss.", "optim.ema"))] + [
        *_model_overrides(folder),
        "stages=[{budget: 64, steps: 4, batch_size: 2}]",
        "optim.ema_decay=0",
        "optim.lr=0.01",
    ]

    def run(out: Path, steps: int):
        cfg = load_config(SFTConfig, overrides=[*overrides, f"run.output_dir={out}", f"train.max_steps={steps}"])
        return train_sft(cfg)

    straight = run(tmp_path / "a", 2)
    first, second = run(tmp_path / "b", 1), run(tmp_path / "b", 2)
    assert straight.steps == 2 and first.steps == 1 and second.steps == 2
    assert all(torch.isfinite(torch.tensor(straight.losses)))
    assert first.losses + second.losses == straight.losses  # the same loop's exact resume, on 2.1
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    resumed, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert weights and all(".lora_" in k for k in weights)  # only adapters are checkpointed
    assert any(not torch.all(v == 0) for k, v in weights.items() if "lora_B" in k)  # B left its zero init
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    exported = load_file(str(tmp_path / "a" / "lora" / DIFFUSERS_FILE))
    # Checkpoints keep peft's adapter name ("lora_A.default.weight"); the export drops it.
    assert {k.removeprefix("transformer.") for k in exported} == {k.replace(".default.", ".") for k in weights}


def test_one_msgrpo_step_on_qwen_image_21_has_ratio_one_and_moves_the_adapters(folder: Path, tmp_path: Path) -> None:
    overrides = [o for o in RL_TINY if not o.startswith(("model.", "rl.budget"))] + [
        *_model_overrides(folder),
        "rl.budget=64",  # K <= 3 references of at least one 32-px VL slot each
        "rl.target_budget=32",  # 2x2 target tokens
        "rl.guidance=1.0",
        "rl.sample_steps=3",
        "rl.group_size=2",
        "optim.lr=0.01",
        f"run.output_dir={tmp_path}",
        "train.max_steps=1",
    ]
    summary = train_rl(load_config(RLConfig, "configs/tiny_msgrpo.yaml", overrides))
    assert summary.steps == 1
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio_mean"] == 1.0  # rollout and update computed bit-identical log-probs
    assert row["grad_norm"] > 0
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert weights and all(".lora_" in k for k in weights)
    assert any(not torch.all(v == 0) for k, v in weights.items() if "lora_B" in k)
    assert (tmp_path / "lora" / DIFFUSERS_FILE).is_file()


def _trained_adapter(transformer: torch.nn.Module, section: LoraSection) -> torch.nn.Module:
    """A copy of ``transformer`` with LoRA whose B is no longer zero (as after training)."""
    ours = copy.deepcopy(transformer)
    inject_lora(ours, section)
    torch.manual_seed(0)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return ours.eval()


def test_diffusers_qwen_image_21_pipeline_loads_our_export_with_identical_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our LoRA export, read by ``QwenImage21Pipeline.load_lora_weights``: the same final latents as
    our sampler with the adapter in place, and not the base model's."""
    from test_qwen21_parity import REFS, _diffusers_latents, _ours_latents

    components = qwen21_tiny.build_components()
    folder = qwen21_tiny.save_folder(components, tmp_path / "base")
    section = LoraSection(enabled=True, rank=4, alpha=8.0)
    ours_net = _trained_adapter(components["transformer"], section)
    export_lora(ours_net, tmp_path / "lora", section)

    theirs = dict(components, transformer=copy.deepcopy(components["transformer"]))
    pipe = qwen21_tiny.diffusers_pipeline(theirs)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}

    mine = EditPipeline.from_pretrained(folder, dtype="fp32", device="cpu")
    mine.model.set_denoiser(ours_net)
    refs, seed, guidance = REFS[:2], 7, 4.0
    with_lora = _ours_latents(mine, refs, seed, guidance, True, monkeypatch)
    loaded = _diffusers_latents(components, refs, seed, guidance, True, pipe=pipe)
    base = _diffusers_latents(components, refs, seed, guidance, True)
    err = (with_lora - loaded).abs().max().item()
    print(f"qwen-image-2.1 LoRA export loaded by diffusers: max abs latent error {err:.2e}")
    assert err <= 1e-5
    assert (loaded - base).abs().max().item() > 1e-3  # the loaded adapter changes the output
    assert set(lora_state_dict(ours_net)) == {
        k.removeprefix("transformer.") for k in load_file(str(tmp_path / "lora" / DIFFUSERS_FILE))
    }
