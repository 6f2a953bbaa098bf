"""Deepen, widen or give reference roles to a trained tiny model without changing what it computes
(issue 17's probes).

Deepen: new joint blocks go in before the last one. A fresh block's modulation is zero (adaLN-zero), so its
gates are zero and it passes both streams through unchanged: the deeper model starts as exactly the
trained one, and fine-tuning decides what the new blocks add. Why: the tiny model's loss flattens
early (docs/models/tiny.md), which points at capacity, and growing from trained weights tests that
at a fraction of a from-scratch run.

Widen (Net2Net): twice the width and heads. Every width-sized vector is stored twice, ``[h, h]``: an
output dimension's weights are copied, an input dimension's are copied and halved, and a chunked
output (q/k/v, the six modulations) is doubled chunk by chunk, so each chunk reads ``[c, c]``. Layer
norms over ``[h, h]`` equal ``[norm(h), norm(h)]`` and every head keeps its size, so the wide model
computes what the narrow one did; the timestep's sinusoids at the new width contain the old ones
(every second frequency). Small noise then breaks the copies' symmetry, or they would stay equal.

Reference roles (``TinyConfig.ref_roles``): the new layer starts at zero, so the model computes what it
did until fine-tuning moves it.

    python -m benchmarks.grow_tiny runs/probes/object_pathway/export_step_00002400 --depth 10 -o runs/probes/deep10_base
    python -m benchmarks.grow_tiny runs/probes/objw8/export_step_00000600 --width 256 -o runs/probes/wide256_base
    python -m benchmarks.grow_tiny src/uniref/assets/tiny --ref-roles -o runs/probes/roles_base
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from uniref.models.tiny import TinyConfig, TinyModel, load_tiny_folder
from uniref.models.tiny_net import TinyMMDiT


def deepen(model: TinyModel, depth: int, seed: int = 0) -> TinyModel:
    """``model`` with ``depth`` joint blocks: all its blocks but the last, fresh identity blocks, then
    its last block."""
    old = model.config.depth
    if depth < old:
        raise ValueError(f"depth {depth}: the model already has {old} blocks")
    config = TinyConfig(**{**asdict(model.config), "depth": depth})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyMMDiT(config, model.net.word_embed.num_embeddings)
    state = net.state_dict()
    for key, value in model.net.state_dict().items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            # Old blocks keep their place, except the last, which stays last.
            key = f"blocks.{int(index) if int(index) < old - 1 else depth - 1}.{rest}"
        state[key] = value
    net.load_state_dict(state)
    net.to(model.device).eval()
    return TinyModel(config, net, model.tokenizer, name=model.name, codec=model.codec)


def with_ref_roles(model: TinyModel) -> TinyModel:
    """``model`` with reference roles switched on (a fresh, zero role layer; every other weight kept)."""
    if model.config.ref_roles:
        raise ValueError("the model already has reference roles")
    config = TinyConfig(**{**asdict(model.config), "ref_roles": True})
    net = TinyMMDiT(config, model.net.word_embed.num_embeddings)
    missing, unexpected = net.load_state_dict(model.net.state_dict(), strict=False)
    if unexpected or any(not key.startswith("role_in.") for key in missing):
        raise ValueError(f"weights do not match (missing {missing}, unexpected {unexpected})")
    net.to(model.device).eval()
    return TinyModel(config, net, model.tokenizer, name=model.name, codec=model.codec)


def _double(value: torch.Tensor, dim: int, width: int, halve: bool) -> torch.Tensor:
    """``value`` with dimension ``dim`` (``k`` chunks of ``width``) doubled chunk by chunk."""
    chunks = value.shape[dim] // width
    shape = (*value.shape[:dim], chunks, width, *value.shape[dim + 1 :])
    parts = value.reshape(shape)
    doubled = torch.cat([parts, parts], dim=dim + 1).flatten(dim, dim + 1)
    return doubled / 2 if halve else doubled


def _time_input(weight: torch.Tensor, new_in: int) -> torch.Tensor:
    """The first timestep layer's weight for sinusoids of ``new_in`` dims: the old features are the new
    ones at every second frequency (cos then sin halves); the other columns start at zero."""
    old_half, new_half = weight.shape[1] // 2, new_in // 2
    cols = torch.cat([torch.arange(old_half) * 2, new_half + torch.arange(old_half) * 2])
    out = weight.new_zeros(weight.shape[0], new_in)
    out[:, cols] = weight
    return out


def widen(model: TinyModel, width: int, noise: float = 1e-3, seed: int = 0) -> TinyModel:
    """``model`` at ``width`` = twice its width (and twice its heads), computing the same function up
    to ``noise`` (relative std of the symmetry-breaking perturbation; 0 for an exact copy)."""
    old = model.config.width
    if width != 2 * old:
        raise ValueError(f"width {width}: only doubling is supported (the model has width {old})")
    config = TinyConfig(**{**asdict(model.config), "width": width, "heads": 2 * model.config.heads})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyMMDiT(config, model.net.word_embed.num_embeddings)
        modules, targets = dict(net.named_modules()), net.state_dict()
        state = {}
        for key, value in model.net.state_dict().items():
            target = targets[key]
            module = modules[key.rsplit(".", 1)[0]]
            if key == "time_embed.0.weight":
                value = _double(_time_input(value, target.shape[1]), 0, old, halve=False)
            elif value.dim() == 2 and isinstance(module, nn.Embedding):
                value = _double(value, 1, old, halve=False)
            else:
                if target.shape[0] == 2 * value.shape[0]:  # an output (or normalised) dimension
                    value = _double(value, 0, old, halve=False)
                if value.dim() == 2 and target.shape[1] == 2 * value.shape[1]:  # an input dimension
                    value = _double(value, 1, old, halve=True)
            if value.shape != target.shape:
                raise ValueError(f"{key}: cannot widen {tuple(value.shape)} to {tuple(target.shape)}")
            if noise and value.dim() == 2 and value.std() > 0:
                value = value + noise * value.std() * torch.randn_like(value)
            state[key] = value
    net.load_state_dict(state)
    net.to(model.device).eval()
    return TinyModel(config, net, model.tokenizer, name=model.name, codec=model.codec)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="tiny model folder")
    parser.add_argument("--depth", type=int, help="joint blocks of the grown model")
    parser.add_argument("--width", type=int, help="width of the grown model (twice the model's)")
    parser.add_argument("--ref-roles", action="store_true", help="switch reference roles on (TinyConfig.ref_roles)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    args = parser.parse_args(argv)
    model = load_tiny_folder(args.model)
    if args.width:
        model = widen(model, args.width)
    if args.depth:
        model = deepen(model, args.depth)
    if args.ref_roles:
        model = with_ref_roles(model)
    print(f"wrote {model.save(args.output)}")


if __name__ == "__main__":
    main()
