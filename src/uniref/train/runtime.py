"""What every trainer shares: device and processes (accelerate), the optimizer and its learning-rate
schedule, EMA, checkpoints with exact resume, logging, and a clean stop on SIGTERM/Ctrl-C.

A trainer (``sft.py``, ``msgrpo.py``) builds a :class:`Runtime`, asks it for the step to start at,
and per step calls :meth:`Runtime.optimizer_step` with its loss; everything else happens here.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniref.config import save_config
from uniref.errors import ConfigError
from uniref.models import EditModel, load_model
from uniref.models.base import resolve_dtype
from uniref.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from uniref.train.config import ModelSection
from uniref.train.data import SampleSource, build_staged_source

METRICS_FILE = "metrics.jsonl"


def start_run(config: Any) -> tuple[EditModel, SampleSource]:
    """Seed, pick the device of this process, build the model and the sample source of a run."""
    from accelerate import PartialState

    torch.manual_seed(config.run.seed)
    state = PartialState(cpu=not torch.cuda.is_available())
    return build_model(config.model, state.device), build_staged_source(config.data, getattr(config, "stages", ()))


def build_model(section: ModelSection, device: torch.device) -> EditModel:
    """Load the configured model, optionally start from a checkpoint's weights, add LoRA."""
    dtype = resolve_dtype(section.dtype, device)
    kwargs: dict[str, Any] = {"device": str(device), "dtype": dtype}
    if section.name in ("tiny-random",) and section.tiny:
        from uniref.models.tiny import TinyConfig, build_tiny

        try:
            model: EditModel = build_tiny(TinyConfig(**section.tiny), name="tiny-random")
        except TypeError as exc:
            raise ConfigError(f"model.tiny: {exc}") from None
        model.denoiser().to(device=device, dtype=dtype)
    else:
        if section.path is not None:
            kwargs["path"] = section.path
        model = load_model(section.name, **kwargs)
    if section.init_from is not None:
        weights, ema, _ = load_checkpoint(section.init_from)
        model.denoiser().load_state_dict(_strip_ema(ema) if ema else weights)
    if section.lora.enabled:
        from uniref.train.lora import inject_lora

        inject_lora(model.denoiser(), section.lora)
    if section.gradient_checkpointing:
        enable = getattr(model.denoiser(), "enable_gradient_checkpointing", None)
        if enable is None:
            raise ConfigError(f"model.gradient_checkpointing: {section.name} does not support it")
        enable()
    if section.compile:
        compile_blocks = getattr(model.denoiser(), "compile_repeated_blocks", None)
        if compile_blocks is None:
            raise ConfigError(f"model.compile: {section.name} has no repeated blocks to compile")
        compile_blocks(dynamic=True)
    return model


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """EMA update for ``AveragedModel`` whose decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n
    updates (as diffusers' EMAModel): a fixed 0.999 would keep ~80 % of the random init for 250 steps,
    so early checkpoints and previews would show noise."""

    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema, current, 1 - d)

    return update


def _strip_ema(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AveragedModel state (``module.`` prefix, ``n_averaged``) -> plain module state."""
    return {k.removeprefix("module."): v for k, v in ema.items() if k != "n_averaged"}


def scaled_param_groups(net: torch.nn.Module, lr: float, scales: dict[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: first those at ``lr`` (group 0, the one logged), then
    one group per ``scales`` key (parameters whose name starts with it, at ``lr`` × its value)."""
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    for prefix, scale in scales.items():
        if scale <= 0:
            raise ConfigError(f"optim.param_lr_scale.{prefix}: {scale} must be > 0")
        if not any(name.startswith(prefix) for name, _ in named):
            raise ConfigError(f"optim.param_lr_scale.{prefix}: no trainable parameter's name starts with it")
    match = {name: next((k for k in scales if name.startswith(k)), None) for name, _ in named}
    groups = [{"params": [p for name, p in named if match[name] is None], "lr": lr}]
    groups += [{"params": [p for name, p in named if match[name] == k], "lr": lr * v} for k, v in scales.items()]
    return [g for g in groups if g["params"]]


class Runtime:
    """Accelerator, optimizer, EMA, checkpoints, logs and signals for one run."""

    def __init__(self, config: Any, model: EditModel, state_of: Callable[[], dict[str, Any]]) -> None:
        from accelerate import Accelerator

        self.config = config
        self.out = Path(config.run.output_dir)
        self.stage_ends = frozenset(config.stage_ends())
        use_cuda = torch.cuda.is_available()
        bf16 = use_cuda and torch.cuda.is_bf16_supported()
        self.accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if bf16 else "no")
        self.model = model
        net = model.denoiser()
        net.train()
        optim = config.optim
        groups = scaled_param_groups(net, optim.lr, optim.param_lr_scale)
        if not groups:
            raise ConfigError("nothing to train: every parameter of the model is frozen")
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        wrapped, self.optimizer = self.accelerator.prepare(net, self.optimizer)
        model.set_denoiser(wrapped)
        self.ema = None
        if optim.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.unwrapped, multi_avg_fn=ema_with_warmup(optim.ema_decay), use_buffers=True)
        self.state_of = state_of  # the trainer's own resumable state (data position, generators)
        self.stop_requested = False
        self.skipped_nonfinite = 0
        self.writer = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out / "config.yaml")
            if config.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))

    # --- properties ---------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model.denoiser())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Weights that change during training (all of them, or only LoRA's)."""
        net = self.unwrapped
        names = {n for n, p in net.named_parameters() if p.requires_grad}
        return {k: v for k, v in net.state_dict().items() if k in names or not self.config.model.lora.enabled}

    def _lr_lambda(self, step: int) -> float:
        return self.config.lr_factor(step)

    # --- resume -------------------------------------------------------------------------------

    def resume(self) -> tuple[int, dict[str, Any] | None]:
        """Restore the newest checkpoint of the output folder, if any: (next step, trainer state)."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return 0, None
        weights, ema, state = load_checkpoint(ckpt)
        self.unwrapped.load_state_dict(weights, strict=not self.config.model.lora.enabled)
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        if self.is_main:
            print(f"resumed from {ckpt} (step {state['step']})", flush=True)
        return state["step"], state["trainer"]

    def save(self, step: int) -> Path | None:
        """Checkpoint after ``step`` optimizer steps (main process writes; all wait)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "trainer": self.state_of(),
                "skipped_nonfinite": self.skipped_nonfinite,
            }
            ema = self.ema.state_dict() if self.ema is not None else None
            path = save_checkpoint(
                self.out, step, self.trainable_state(), state, ema, self.config.log.keep_last, self.stage_ends
            )
        self.accelerator.wait_for_everyone()
        return path

    # --- stepping -----------------------------------------------------------------------------

    def optimizer_step(self, loss: torch.Tensor) -> dict[str, float] | None:
        """Backward, clip, step, EMA. A non-finite loss or gradient skips the step (counted)."""
        self.optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.world > 1:  # all ranks must agree to skip, or DDP would deadlock
            finite = self.accelerator.reduce(finite, reduction="mean")
        if finite.item() < 1.0:
            self.skipped_nonfinite += 1
            self.scheduler.step()
            return None
        self.accelerator.backward(loss)
        params = [p for p in self.model.denoiser().parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(params, self.config.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_nonfinite += 1
            self.scheduler.step()
            return None
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped)
        return {"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}

    def end_step(self, done: int, total: int, hooks: Any = None) -> bool:
        """After optimizer step ``done``: checkpoint when due (every ``log.checkpoint_every``, at the end,
        or on a stop request), then test hooks. True: the loop must stop now."""
        due = done % self.config.log.checkpoint_every == 0 or done in self.stage_ends
        if due or done == total or self.stop_requested:
            self.save(done)
        if hooks is not None:
            hooks.after_step(done, self)
        return self.stop_requested

    def finish(self) -> bool:
        """Export LoRA adapters (if any) and close the logs; returns whether the run was interrupted."""
        lora = self.config.model.lora
        if lora.enabled and self.is_main:
            from uniref.train.lora import export_lora

            export_lora(self.unwrapped, self.out / "lora", lora)
        self.close()
        return self.stop_requested

    def mean_across(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach()
        return self.accelerator.reduce(value.to(self.device), reduction="mean") if self.world > 1 else value

    # --- logs ---------------------------------------------------------------------------------

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        with open(self.out / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM / Ctrl-C ask the loop to checkpoint and exit after the current step."""

        def request(signum: int, frame: Any) -> None:
            self.stop_requested = True

        old = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def sampling_model(self, ema: bool = True) -> Iterator[EditModel]:
        """The model unwrapped and in eval mode, with its EMA weights if ``ema`` (previews, validation)
        or its current ones (RL rollouts); training weights, wrapper and mode are restored afterwards."""
        wrapped = self.model.denoiser()
        net = self.unwrapped
        use_ema = ema and self.ema is not None
        backup = {k: v.detach().clone() for k, v in net.state_dict().items()} if use_ema else None
        if use_ema:
            net.load_state_dict(_strip_ema(self.ema.state_dict()), strict=False)
        self.model.set_denoiser(net)
        net.eval()
        try:
            yield self.model
        finally:
            net.train()
            if backup is not None:
                net.load_state_dict(backup)
            self.model.set_denoiser(wrapped)
