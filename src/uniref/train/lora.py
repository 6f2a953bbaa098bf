"""LoRA adapters: inject (peft), and export in the two formats people load them with.

* **diffusers**: ``pytorch_lora_weights.safetensors`` written by diffusers' own
  ``QwenImageEditPlusPipeline.save_lora_weights`` (keys ``transformer.<module>.lora_A/B.weight``, with
  the adapter config as metadata), so ``pipe.load_lora_weights(folder)`` reads it back.
* **ComfyUI**: ``comfyui_lora.safetensors`` with keys ``diffusion_model.<module>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (the kohya/ComfyUI convention: scale = alpha / rank).

Target modules (``model.lora.target_modules``, peft matching: a module whose name is, or ends with
``.`` +, a target). The default is every attention projection of both Qwen families: the dual-stream
Qwen-Image-Edit blocks (``to_q``/``to_k``/``to_v``/``to_out.0`` for image tokens, ``add_*_proj`` for
text tokens) and the single-stream Qwen-Image-2.1 blocks, whose one attention over text, reference
and target tokens is ``to_q``/``to_k``/``to_v``/``to_out.0``; targets a model lacks are skipped, and
a list of which none matches is a :class:`~uniref.errors.ConfigError`. The 2.1 diffusers pipeline
loads LoRA through the same ``QwenImageLoraLoaderMixin``, so one export serves both families.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from uniref.errors import ConfigError
from uniref.images import atomic_path
from uniref.train.config import LoraSection

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "comfyui_lora.safetensors"


def inject_lora(net: nn.Module, section: LoraSection) -> nn.Module:
    """Freeze ``net`` and add trainable LoRA adapters to the modules named in ``section``."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [name for name, _ in net.named_modules()]
    if not any(_matches(name, target) for name in names for target in section.target_modules):
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: none of {list(section.target_modules)} is a module of "
            f"{type(net).__name__}; its linear layers end in {', '.join(layers)}"
        )
    net.requires_grad_(False)
    config = LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        init_lora_weights=True,
    )
    return inject_adapter_in_model(config, net)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string target: the whole module name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming (``<module>.lora_A.weight``), without the adapter name."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}


def export_lora(net: nn.Module, out_dir: str | Path, section: LoraSection) -> dict[str, Path]:
    """Write the adapters of ``net`` as diffusers and ComfyUI safetensors into ``out_dir``."""
    from diffusers import QwenImageEditPlusPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(net)
    # diffusers writes the file itself; we write to a temporary name and rename so it is atomic.
    with atomic_path(out_dir / DIFFUSERS_FILE) as tmp:
        QwenImageEditPlusPipeline.save_lora_weights(
            tmp.parent,
            transformer_lora_layers=state,
            weight_name=tmp.name,
            transformer_lora_adapter_metadata={
                "r": section.rank,
                "lora_alpha": section.alpha,
                "target_modules": list(section.target_modules),
            },
        )
    comfy: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)  # "<module>", "A.weight" | "B.weight"
        name = "lora_down" if kind.startswith("A") else "lora_up"
        comfy[f"diffusion_model.{module}.{name}.weight"] = value
        comfy[f"diffusion_model.{module}.alpha"] = torch.tensor(float(section.alpha))
    with atomic_path(out_dir / COMFYUI_FILE) as tmp:
        save_file(comfy, str(tmp), metadata={"format": "pt", "rank": str(section.rank)})
    return {"diffusers": out_dir / DIFFUSERS_FILE, "comfyui": out_dir / COMFYUI_FILE}
