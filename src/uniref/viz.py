"""Contact sheets: one row per sample with its references, images and a text column.

Shared by ``uniref data show`` (references | target | instruction) and ``uniref eval``'s worst-case grid
(references | output | target | instruction + scores), so both draw with one implementation.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from uniref.data.sample import Sample

SHEET_THUMB = 96  # thumbnail height in pixels
SHEET_TEXT_WIDTH = 360  # pixels of the text column
SHEET_PAD = 6
SHEET_CHARS = 52  # characters per line of wrapped text
SHEET_FONT_SIZE = 12
SEPARATOR = 2  # width of the line between references and results
BLACK, WHITE = (0, 0, 0), (255, 255, 255)


@dataclass
class SheetRow:
    refs: list[Image.Image]  # left of the separator
    images: list[Image.Image]  # right of it (target; or output and target)
    text: str
    extra_lines: list[str] = field(default_factory=list)  # e.g. scores, not wrapped


def _thumb(img: Image.Image) -> Image.Image:
    w = max(1, round(img.width * SHEET_THUMB / img.height))
    return img.convert("RGB").resize((w, SHEET_THUMB), Image.Resampling.LANCZOS)


def draw_sheet(rows: Sequence[SheetRow]) -> Image.Image:
    """One row per entry: reference thumbnails, a separator, the other images, then the wrapped text."""
    thumbs = [([_thumb(r) for r in row.refs], [_thumb(i) for i in row.images]) for row in rows]

    def width(imgs: list[Image.Image]) -> int:
        return sum(t.width + SHEET_PAD for t in imgs)

    img_width = max(width(refs) + SHEET_PAD * 3 + width(imgs) for refs, imgs in thumbs)
    sheet_width = img_width + SHEET_TEXT_WIDTH + SHEET_PAD
    texts = [textwrap.wrap(row.text, SHEET_CHARS) + row.extra_lines for row in rows]
    font = ImageFont.load_default(size=SHEET_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # A long instruction makes its row taller instead of running into the next row.
    heights = [max(SHEET_THUMB, probe.multiline_textbbox((0, 0), "\n".join(t), font=font)[3]) for t in texts]
    height = sum(h + SHEET_PAD for h in heights) + SHEET_PAD
    sheet = Image.new("RGB", (sheet_width, height), WHITE)
    draw = ImageDraw.Draw(sheet)
    y = SHEET_PAD
    for (refs, imgs), lines, row_height in zip(thumbs, texts, heights, strict=True):
        x = SHEET_PAD
        for t in refs:
            sheet.paste(t, (x, y))
            x += t.width + SHEET_PAD
        x += SHEET_PAD * 2
        draw.line([(x - SHEET_PAD * 2, y), (x - SHEET_PAD * 2, y + SHEET_THUMB)], fill=BLACK, width=SEPARATOR)
        for t in imgs:
            sheet.paste(t, (x, y))
            x += t.width + SHEET_PAD
        draw.multiline_text((img_width + SHEET_PAD, y), "\n".join(lines), fill=BLACK, font=font)
        y += row_height + SHEET_PAD
    return sheet


def contact_sheet(samples: Sequence[Sample]) -> Image.Image:
    """references | target | ``[task] instruction``, one sample per row."""
    rows = [
        SheetRow(list(s.refs), [s.target], f"[{s.task}] {s.instruction}" if s.task else s.instruction) for s in samples
    ]
    return draw_sheet(rows)
