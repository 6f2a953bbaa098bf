"""The README's Quickstart picture: the three example references, then what the embedded default makes of
the Quickstart instruction for seeds 0-3 (seed 0 is what the Quickstart command writes).

    python -m benchmarks.quickstart_figure      # writes docs/quickstart.png
"""

from __future__ import annotations

from pathlib import Path

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


def main() -> None:
    refs = [load_image(ROOT / "examples" / f"{name}.png") for name in EXAMPLES]
    pipe = EditPipeline.from_pretrained("tiny")
    like = image_size(refs[0])  # --size-like 1
    outputs = [pipe.generate(INSTRUCTION, refs, seed=s, progress=False, target_like=like).images[0] for s in SEEDS]
    row = SheetRow(refs, outputs, INSTRUCTION, [f"outputs: seeds {', '.join(map(str, SEEDS))} (seed 0 = out.png)"])
    save_image(draw_sheet([row]), ROOT / "docs" / "quickstart.png")


if __name__ == "__main__":
    main()
