"""Per-reference diagnostics: how much attention the output's tokens give each reference.

A model that exposes its attention (the tiny flavour does: ``model.record_attention()``) fills an
:class:`AttentionLog` during sampling with, per sample, layer and output token, the attention mass
(softmax weights summed over the keys of a group, averaged over heads) that goes to the output itself,
the instruction, and each reference. :func:`write_explanation` turns one sample's log into what a
person reads: a heat map per reference over the output, one summary line, and the per-layer JSON.
A composition that drops picture 3 shows up here as picture 3 getting almost none of the attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from uniref.images import atomic_path, save_image

SELF, TEXT = 0, 1  # groups 0 and 1; reference i (1-based) is group i + 1
HEAT_ALPHA = 0.6  # opacity of the heat map over the output


@dataclass
class AttentionLog:
    """Sums over sampler calls of per-sample attention masses (layers, target tokens, 2 + K)."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)  # target token grid (h, w)

    def add(self, sample: int, masses: torch.Tensor, grid: tuple[int, int]) -> None:
        masses = masses.detach().float().cpu()
        self.sums[sample] = self.sums[sample] + masses if sample in self.sums else masses
        self.calls[sample] = self.calls.get(sample, 0) + 1
        self.grids[sample] = grid

    def mean(self, sample: int = 0) -> torch.Tensor:
        """Masses of ``sample`` averaged over sampler calls: (layers, target tokens, 2 + K)."""
        if sample not in self.sums:
            raise KeyError(f"no attention recorded for sample {sample}")
        return self.sums[sample] / self.calls[sample]


def summarise_attention(masses: torch.Tensor) -> dict[str, Any]:
    """The JSON of one sample: per reference its share of the attention the output gives to all
    references, its mass of all attention, both per layer; the same for the instruction and itself."""
    per_layer = masses.mean(dim=1)  # (layers, 2 + K)
    overall = per_layer.mean(dim=0)
    k = masses.shape[-1] - 2
    ref_total = overall[2:].sum().clamp_min(1e-12)
    ref_total_layer = per_layer[:, 2:].sum(dim=1).clamp_min(1e-12)
    return {
        "layers": int(masses.shape[0]),
        "output_tokens": int(masses.shape[1]),
        "self": {"mass": float(overall[SELF]), "mass_per_layer": per_layer[:, SELF].tolist()},
        "instruction": {"mass": float(overall[TEXT]), "mass_per_layer": per_layer[:, TEXT].tolist()},
        "references": [
            {
                "picture": i + 1,
                "share": float(overall[i + 2] / ref_total),
                "mass": float(overall[i + 2]),
                "share_per_layer": (per_layer[:, i + 2] / ref_total_layer).tolist(),
                "mass_per_layer": per_layer[:, i + 2].tolist(),
            }
            for i in range(k)
        ],
    }


def summary_line(summary: dict[str, Any]) -> str:
    """'picture 1 got 52 % of the attention, picture 2 got 48 % (references get 31 % of all the
    output's attention, the instruction 20 %)': shares among the references, then the totals."""
    refs = summary["references"]
    parts = [f"picture {r['picture']} got {100 * r['share']:.0f} %" for r in refs]
    to_refs = sum(r["mass"] for r in refs)
    totals = f"references get {100 * to_refs:.0f} % of all the output's attention"
    return (
        ", ".join(parts) + f" of the attention ({totals}, the instruction {100 * summary['instruction']['mass']:.0f} %)"
    )


def heat_map(image: Image.Image, values: np.ndarray, vmax: float | None = None) -> Image.Image:
    """``values`` (h, w) >= 0 over the output, divided by ``vmax`` (default its max), blended on
    ``image`` (black → red → yellow)."""
    v = np.clip(values / max(float(values.max() if vmax is None else vmax), 1e-12), 0, 1)
    rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], axis=-1)
    heat = Image.fromarray((rgb * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image.convert("RGB"), heat, HEAT_ALPHA)


def write_explanation(out: str | Path, image: Image.Image, masses: torch.Tensor, grid: tuple[int, int]) -> str:
    """Write ``attention.json``, ``picture_<i>.png`` (heat map of the mass reference i gets from each
    output token) and ``explain.png`` (output and heat maps side by side) into ``out``; returns the
    summary line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise_attention(masses)
    line = summary_line(summary)
    summary["summary"] = line
    h, w = grid
    per_token = masses.mean(dim=0).numpy()  # (h·w, 2 + K)
    vmax = float(per_token[:, 2:].max()) if per_token.shape[1] > 2 else 1.0  # one scale: a lost picture is dark
    panels = [image.convert("RGB")]
    for r in summary["references"]:
        values = per_token[:, r["picture"] + 1].reshape(h, w)
        panel = heat_map(image, values, vmax)
        save_image(panel, out / f"picture_{r['picture']}.png")
        panels.append(panel)
    label = 14
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), image.height + label), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for i, panel in enumerate(panels):
        sheet.paste(panel, (x, label))
        text = "output" if i == 0 else f"picture {i}: {100 * summary['references'][i - 1]['share']:.0f} %"
        draw.text((x + 2, 1), text, fill="black")
        x += panel.width + 4
    save_image(sheet, out / "explain.png")
    with atomic_path(out / "attention.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return line
