"""From a training checkpoint to something people load: a tiny model folder, or LoRA safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from uniref.config import build_config, read_yaml
from uniref.errors import ConfigError, ModelError
from uniref.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from uniref.train.config import RLConfig, SFTConfig
from uniref.train.runtime import _strip_ema, build_model


def _run_config(run: Path) -> SFTConfig | RLConfig:
    data = read_yaml(run / "config.yaml")
    return build_config(RLConfig if "rl" in data else SFTConfig, data, str(run / "config.yaml"))


def export_run(
    run: str | Path,
    out: str | Path,
    step: int | None = None,
    ema: bool = True,
    half: bool = False,
    guidance: float | None = None,
    noise_level: float | None = None,
) -> Path:
    """Export checkpoint ``step`` (default: newest) of ``run`` into ``out``; returns ``out``. ``guidance``
    (tiny) is the true-CFG scale the pipeline will use by default, chosen after training on the
    validation split; it needs a run trained with ``loss.instruction_dropout``. ``noise_level`` (tiny) is
    the sampler's default SDE noise level, also chosen on the validation split."""
    run, out = Path(run), Path(out)
    config = _run_config(run)
    ckpts = {int(p.name.split("_")[-1]): p for p in list_checkpoints(run)}
    ckpt = ckpts.get(step) if step is not None else latest_checkpoint(run)
    if ckpt is None:
        raise ModelError(f"{run}: no checkpoint{'' if step is None else f' at step {step}'} (have {sorted(ckpts)})")
    weights, ema_weights, state = load_checkpoint(ckpt)
    model = build_model(config.model.model_copy(update={"init_from": None, "compile": False}), torch.device("cpu"))
    net = model.denoiser()
    chosen = _strip_ema(ema_weights) if ema and ema_weights is not None else weights
    net.load_state_dict(chosen, strict=not config.model.lora.enabled)
    if config.model.lora.enabled:
        from uniref.train.lora import export_lora

        export_lora(net, out, config.model.lora)
        return out
    from uniref.models.tiny import TinyModel

    if not isinstance(model, TinyModel):
        raise ModelError(f"{run}: full fine-tunes of {config.model.name} are exported by saving the transformer")
    native: dict[str, float] = {}
    if isinstance(config, SFTConfig):
        _, stage = config.stage_at(max(0, state["step"] - 1))
        native = dict(stage.pixel_budgets())
        if guidance is not None and guidance > 1 and config.loss.instruction_dropout == 0:
            raise ConfigError(
                f"--guidance {guidance:g}: {run} was trained without loss.instruction_dropout, so its negative "
                "prompt was never trained; export it with --guidance 1"
            )
    if guidance is not None:
        native["guidance"] = guidance
    if noise_level is not None:
        native["noise_level"] = noise_level
    model.save(out, dtype=torch.float16 if half else None, **native)
    return out
