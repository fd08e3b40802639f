"""Text drawn as an RGB image, for ``render_mode="rgb_array"`` (video recorders, SB3's helpers).

Pillow's built-in bitmap font (6 x 11 pixels a character, Latin-1) draws the text on a fixed-size
canvas, wrapped at a fixed number of columns; when the text needs more rows than the canvas has,
the last rows are shown, since generation happens at the end. Pillow is installed with
matplotlib, a dependency of the project.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageFont

CHAR_WIDTH, CHAR_HEIGHT, LINE_HEIGHT, MARGIN = 6, 11, 13, 4
BACKGROUND = (255, 255, 255)
PROMPT_COLOUR = (40, 70, 160)
GENERATED_COLOUR = (0, 0, 0)


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    # load_default() returns a TrueType font since Pillow 10.1 when FreeType is available.
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def image_shape(columns: int, rows: int, scale: int = 1) -> tuple[int, int, int]:
    """(H, W, 3): the shape of every image :func:`text_image` draws with these settings."""
    height = (2 * MARGIN + rows * LINE_HEIGHT) * scale
    width = (2 * MARGIN + columns * CHAR_WIDTH) * scale
    return height, width, 3


def _lines(text: str, columns: int) -> list[tuple[int, str]]:
    """``text`` hard-wrapped at ``columns`` characters: (offset in ``text``, line) pairs."""
    lines, offset = [], 0
    for paragraph in text.split("\n"):
        chunks = [paragraph[i : i + columns] for i in range(0, len(paragraph), columns)] or [""]
        for chunk in chunks:
            lines.append((offset, chunk))
            offset += len(chunk)
        offset += 1  # the newline
    return lines


def text_image(
    text: str, prompt_chars: int = 0, columns: int = 64, rows: int = 4, scale: int = 2
) -> np.ndarray:
    """Draw ``text`` (its first ``prompt_chars`` characters in the prompt's colour).

    Args:
        text: the text to draw; characters outside Latin-1 are drawn as ``?``.
        prompt_chars: how many leading characters are the prompt.
        columns: characters a line.
        rows: lines on the canvas; longer text shows its last ``rows`` lines.
        scale: each pixel of the font becomes ``scale x scale`` pixels.

    Returns:
        (H, W, 3) uint8, H and W as :func:`image_shape` gives.
    """
    from PIL import Image, ImageDraw

    text = text.replace("\t", " ").encode("latin-1", errors="replace").decode("latin-1")
    height, width, _ = image_shape(columns, rows)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row, (start, line) in enumerate(_lines(text, columns)[-rows:]):
        y = MARGIN + row * LINE_HEIGHT
        split = min(max(prompt_chars - start, 0), len(line))
        if split:
            draw.text((MARGIN, y), line[:split], font=_font(), fill=PROMPT_COLOUR)
        if split < len(line):
            x = MARGIN + split * CHAR_WIDTH
            draw.text((x, y), line[split:], font=_font(), fill=GENERATED_COLOUR)
    pixels = np.asarray(image, dtype=np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.ascontiguousarray(pixels)
