"""The README's Quickstart picture: the three example references, then what the embedded default makes of
the Quickstart instruction for seeds 0-3 (seed 0 is what the Quickstart command writes).

    python -m benchmarks.quickstart_figure                # writes docs/quickstart.png
    python -m benchmarks.quickstart_figure --variants     # writes docs/quickstart_variants.png

``--variants`` asks the same composition in other words and orders (phrases swapped, slots swapped,
pictures 2 and 3 swapped with the instruction following them, each object alone): which part of the
instruction an output follows, e.g. whether a slot takes the object named first instead of its own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from uniref.images import image_size, load_image, save_image
from uniref.pipeline import EditPipeline
from uniref.viz import SheetRow, draw_sheet

ROOT = Path(__file__).resolve().parent.parent
# Keep in step with the README's Quickstart command.
INSTRUCTION = (
    "put the red circle from picture 2 on the left and the blue square from picture 3 on the right "
    "on the background of picture 1"
)
EXAMPLES = ("background", "red_circle", "blue_square")
SEEDS = (0, 1, 2, 3)
BG = " on the background of picture 1"
# (instruction, example pictures in reference order): the same scene asked in other ways.
VARIANTS = (
    (INSTRUCTION, EXAMPLES),
    ("put the blue square from picture 3 on the right and the red circle from picture 2 on the left" + BG, EXAMPLES),
    ("put the red circle from picture 2 on the right and the blue square from picture 3 on the left" + BG, EXAMPLES),
    (
        "put the red circle from picture 3 on the left and the blue square from picture 2 on the right" + BG,
        ("background", "blue_square", "red_circle"),
    ),
    ("put the red circle from picture 2 on the left" + BG, ("background", "red_circle")),
    ("put the blue square from picture 2 on the right" + BG, ("background", "blue_square")),
)


def outputs(pipe: EditPipeline, instruction: str, refs: Sequence[Image.Image]) -> list[Image.Image]:
    """What ``pipe`` makes for seeds 0-3, at picture 1's aspect (the Quickstart's ``--size-like 1``)."""
    like = image_size(refs[0])
    return [pipe.generate(instruction, list(refs), seed=s, progress=False, target_like=like).images[0] for s in SEEDS]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", action="store_true", help="the instruction in other orders and words")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    pipe = EditPipeline.from_pretrained(args.model)
    pictures = {name: load_image(ROOT / "examples" / f"{name}.png") for name in EXAMPLES}
    seeds = f"outputs: seeds {', '.join(map(str, SEEDS))}"
    if not args.variants:
        refs = [pictures[name] for name in EXAMPLES]
        row = SheetRow(refs, outputs(pipe, INSTRUCTION, refs), INSTRUCTION, [f"{seeds} (seed 0 = out.png)"])
        save_image(draw_sheet([row]), ROOT / "docs" / "quickstart.png")
        return
    rows = []
    for instruction, names in VARIANTS:
        refs = [pictures[name] for name in names]
        rows.append(SheetRow(refs, outputs(pipe, instruction, refs), instruction, [seeds]))
    save_image(draw_sheet(rows), ROOT / "docs" / "quickstart_variants.png")


if __name__ == "__main__":
    main()
