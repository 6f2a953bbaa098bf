"""Deepen a trained tiny model without changing what it computes (issue 17's capacity probe).

New joint blocks go in before the last one. A fresh block's modulation is zero (adaLN-zero), so its
gates are zero and it passes both streams through unchanged: the deeper model starts as exactly the
trained one, and fine-tuning decides what the new blocks add. Why: the tiny model's loss flattens
early (docs/models/tiny.md), which points at capacity, and growing from trained weights tests that
at a fraction of a from-scratch run.

    python -m benchmarks.grow_tiny runs/probes/object_pathway/export_step_00002400 --depth 10 -o runs/probes/deep10_base
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="tiny model folder")
    parser.add_argument("--depth", type=int, required=True, help="joint blocks of the grown model")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    args = parser.parse_args(argv)
    print(f"wrote {deepen(load_tiny_folder(args.model), args.depth).save(args.output)}")


if __name__ == "__main__":
    main()
