"""The glyph source of the zoo dataset: TrueType fonts shipped inside the matplotlib wheel.

They are the only fonts we can count on without a download, so the dataset is reproducible on
any machine that has matplotlib. Which fonts qualify depends on the matplotlib version; the
dataset card records the list.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

CLASSES = string.digits + string.ascii_uppercase + string.ascii_lowercase

# Fonts that map the 62 code points to something other than letters and digits:
# cmsy/cmex are TeX symbol fonts whose BaKoMa cmaps reuse ASCII slots for symbols, and LastResort
# draws the same fallback box for every code point of a block.
NOT_TEXT_FONTS = ("cmsy10", "cmex10", "LastResortHE")

GLYPH_CANVAS = 64
"""Glyphs are drawn at twice the output size so warps and the final 2x reduction anti-alias."""

GLYPH_POINT_SIZE = 48


def font_directory() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def covers_all_classes(font_path: Path) -> bool:
    cmap = TTFont(font_path, lazy=True).getBestCmap() or {}
    return all(ord(character) in cmap for character in CLASSES)


@functools.cache
def text_fonts() -> tuple[Path, ...]:
    """Sorted so a font's index, which the per-sample generator draws, means the same font everywhere."""
    candidates = sorted(font_directory().glob("*.ttf"))
    return tuple(
        path for path in candidates
        if not path.stem.startswith(NOT_TEXT_FONTS) and covers_all_classes(path)
    )


@functools.cache
def glyph_mask(font_index: int, class_index: int) -> np.ndarray:
    """Coverage (uint8, 0..255) of one character centred on the canvas; cached because
    every sample of a (font, class) pair starts from the same drawing."""
    font = ImageFont.truetype(str(text_fonts()[font_index]), GLYPH_POINT_SIZE)
    canvas = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS), 0)
    centre = GLYPH_CANVAS / 2
    ImageDraw.Draw(canvas).text((centre, centre), CLASSES[class_index], fill=255, font=font, anchor="mm")
    return np.asarray(canvas)
