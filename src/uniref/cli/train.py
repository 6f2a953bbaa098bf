"""``uniref train sft | rl``: the training stages, configured by YAML plus ``a.b=c`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uniref.cli import app
from uniref.config import load_config

train_app = typer.Typer(help="Training: SFT (flow matching) and RL (MSGRPO).", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("sft", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sft_command(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="YAML config, e.g. configs/tiny_sft.yaml")],
) -> None:
    """Flow-matching SFT with the progressive budget. Extra arguments KEY=VALUE override the config;
    rerunning into the same run.output_dir resumes from its newest checkpoint."""
    from uniref.train.config import SFTConfig
    from uniref.train.sft import train_sft

    cfg = load_config(SFTConfig, config, ctx.args)
    _report(train_sft(cfg), cfg)


def _report(summary: Any, cfg: Any) -> None:
    status = "interrupted, checkpoint saved" if summary.interrupted else "done"
    typer.echo(
        f"{status}: {summary.steps} steps in {cfg.run.output_dir}"
        + (f" (last loss {summary.losses[-1]:.4f})" if summary.losses else "")
        + (f", {summary.skipped_nonfinite} non-finite steps skipped" if summary.skipped_nonfinite else "")
    )


@train_app.command("rl", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def rl_command(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="YAML config, e.g. configs/tiny_msgrpo.yaml")],
) -> None:
    """MSGRPO: multi-source GRPO with per-reference rewards. Extra arguments KEY=VALUE override the
    config; rerunning into the same run.output_dir resumes from its newest checkpoint."""
    from uniref.train.config import RLConfig
    from uniref.train.msgrpo import train_rl

    cfg = load_config(RLConfig, config, ctx.args)
    _report(train_rl(cfg), cfg)


@train_app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="a training output folder (run.output_dir)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="where to write the model folder")],
    step: Annotated[int | None, typer.Option(help="checkpoint step (default: the newest)")] = None,
    ema: Annotated[bool, typer.Option(help="export the EMA weights when the run kept them")] = True,
    half: Annotated[bool, typer.Option(help="store float16 weights (tiny; half the bytes)")] = False,
    guidance: Annotated[
        float | None, typer.Option(min=1.0, help="default true-CFG scale stored with a tiny model (1 = off)")
    ] = None,
    noise_level: Annotated[
        float | None,
        typer.Option("--noise-level", min=0.0, help="default SDE noise level stored with a tiny model (0 = Euler)"),
    ] = None,
) -> None:
    """Turn a checkpoint into a model folder `--model` accepts (tiny), or LoRA safetensors (diffusers +
    ComfyUI) for adapter runs."""
    from uniref.train.export import export_run

    written = export_run(run, out, step=step, ema=ema, half=half, guidance=guidance, noise_level=noise_level)
    typer.echo(f"wrote {written}")


@train_app.command("codec")
def codec_command(
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for codec.json + codec.safetensors")],
    minutes: Annotated[float, typer.Option(min=0.05, help="wall time to train for")] = 15.0,
    channels: Annotated[int, typer.Option(min=1, help="latent channels per 8×8 cell")] = 16,
    width: Annotated[int, typer.Option(min=4, help="feature width at full resolution")] = 16,
    seed: Annotated[int, typer.Option(help="data and initialisation seed")] = 0,
    crop: Annotated[int, typer.Option(min=16, help="training crop side in pixels (a multiple of 8)")] = 32,
) -> None:
    """Train the tiny flavour's autoencoder on generated scenes (then frozen; see uniref.models.codec)."""
    from uniref.models.codec import CodecConfig, train_codec

    _, psnr = train_codec(out, minutes, CodecConfig(channels=channels, width=width), seed=seed, side=crop)
    typer.echo(f"wrote {out}: held-out reconstruction PSNR {psnr:.2f} dB")
