import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_sft import TINY
from uniref.config import load_config
from uniref.train.checkpoint import latest_checkpoint, load_checkpoint
from uniref.train.config import LoraSection, SFTConfig
from uniref.train.lora import COMFYUI_FILE, DIFFUSERS_FILE, export_lora, inject_lora, lora_state_dict
from uniref.train.sft import train_sft


def test_lora_training_changes_only_adapters_and_exports_both_formats(tmp_path: Path) -> None:
    cfg = load_config(
        SFTConfig,
        overrides=[
            *TINY,
            f"run.output_dir={tmp_path}",
            "train.max_steps=2",
            "model.lora.enabled=true",
            "model.lora.rank=4",
            "model.lora.alpha=8",
            "model.lora.target_modules=[qkv, modulation]",  # random base: gates start at 0
            "optim.lr=0.01",
        ],
    )
    summary = train_sft(cfg)
    assert summary.steps == 2
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert weights and all(".lora_" in k for k in weights)  # only adapters are checkpointed
    assert any(not torch.all(v == 0) for k, v in weights.items() if "lora_B" in k)  # B moved off its zero init
    diffusers_sd = load_file(str(tmp_path / "lora" / DIFFUSERS_FILE))
    comfy = load_file(str(tmp_path / "lora" / COMFYUI_FILE))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in diffusers_sd)
    n_modules = len(diffusers_sd) // 2
    assert len(comfy) == 3 * n_modules
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {8.0}


def test_diffusers_loads_our_export_into_qwen_transformer_with_identical_outputs(tmp_path: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline

    from qwen_tiny import build_components

    base = build_components()["transformer"]
    ours = copy.deepcopy(base)
    section = LoraSection(enabled=True, rank=4, alpha=8.0)
    inject_lora(ours, section)
    torch.manual_seed(0)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    export_lora(ours, tmp_path, section)

    theirs = copy.deepcopy(base)
    # What pipe.load_lora_weights(folder) does, on the bare transformer.
    state, metadata = QwenImageEditPlusPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    QwenImageEditPlusPipeline.load_lora_into_transformer(state, transformer=theirs, metadata=metadata)

    torch.manual_seed(1)
    img = torch.randn(1, 2 * 4, 16)  # target 2x2 tokens + ref 2x2 tokens of 4 latent channels x 2x2 patch
    txt = torch.randn(1, 5, 16)
    kwargs = {
        "hidden_states": img,
        "encoder_hidden_states": txt,
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 2, 2), (1, 2, 2)]],
        "return_dict": False,
    }
    with torch.no_grad():
        a, b, plain = ours(**kwargs)[0], theirs(**kwargs)[0], base(**kwargs)[0]
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter matters
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert set(lora_state_dict(ours)) == {
        k.removeprefix("transformer.") for k in load_file(str(tmp_path / DIFFUSERS_FILE))
    }
