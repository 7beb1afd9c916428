"""Draws one dataset sample from its own random generator.

Everything after the generator runs in uint8 PIL/numpy integer arithmetic: integer image code is
bit-identical across CPUs, whereas vectorised float transcendentals (np.sin, np.exp) may differ in
the last bit between SIMD code paths and would break the dataset hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tools.zoo import fonts

IMAGE_SIZE = 32


@dataclass(frozen=True)
class Difficulty:
    """Ranges of the random distortions; tuned so a small fp32 net lands near 90%, not 100%,
    leaving room for quantization error to show."""

    max_rotation_degrees: float = 20.0
    max_shear: float = 0.3
    scale_range: tuple[float, float] = (0.8, 1.2)
    max_translation_pixels: float = 6.0  # on the 64-pixel glyph canvas
    max_blur_radius: float = 1.0
    max_noise_amplitude: int = 16
    min_contrast: int = 96  # luminance gap between glyph and mean background, 0..255
    max_background_spread: int = 60  # how far background blobs stray from the base colour
    distractor_line_probability: float = 0.25


DEFAULT_DIFFICULTY = Difficulty()


def glyph_to_canvas_affine(rng: np.random.Generator, difficulty: Difficulty) -> tuple[float, ...]:
    """PIL's AFFINE transform wants the output->input mapping, so build the forward warp
    (scale, shear, rotate about the centre, then shift) and invert it."""
    angle = math.radians(rng.uniform(-difficulty.max_rotation_degrees, difficulty.max_rotation_degrees))
    shear = rng.uniform(-difficulty.max_shear, difficulty.max_shear)
    scale_x, scale_y = rng.uniform(*difficulty.scale_range, size=2)
    shift_x, shift_y = rng.uniform(-difficulty.max_translation_pixels, difficulty.max_translation_pixels, size=2)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    shearing = np.array([[1.0, shear], [0.0, 1.0]])
    forward = rotation @ shearing @ np.diag([scale_x, scale_y])
    inverse = np.linalg.inv(forward)
    centre = np.full(2, fonts.GLYPH_CANVAS / 2)
    offset = centre - inverse @ (centre + np.array([shift_x, shift_y]))
    return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def warped_glyph(rng: np.random.Generator, class_index: int, difficulty: Difficulty) -> np.ndarray:
    font_index = int(rng.integers(len(fonts.text_fonts())))
    glyph = Image.fromarray(fonts.glyph_mask(font_index, class_index))
    canvas_size = (fonts.GLYPH_CANVAS, fonts.GLYPH_CANVAS)
    warped = glyph.transform(canvas_size, Image.AFFINE, glyph_to_canvas_affine(rng, difficulty), Image.BILINEAR)
    reduced = warped.reduce(fonts.GLYPH_CANVAS // IMAGE_SIZE)
    blur_radius = rng.uniform(0.0, difficulty.max_blur_radius)
    return np.asarray(reduced.filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.int32)


def background(rng: np.random.Generator, difficulty: Difficulty) -> Image.Image:
    """Smooth colour blobs, optionally striped, optionally crossed by a line: clutter a
    classifier must learn to ignore, and a wide activation range for calibration."""
    grid = int(rng.integers(1, 5))
    base = rng.integers(0, 256, size=3)
    spread = int(rng.integers(0, difficulty.max_background_spread + 1))
    blobs = np.clip(base + rng.integers(-spread, spread + 1, size=(grid, grid, 3)), 0, 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(blobs).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.int32)
    if rng.random() < 0.5:
        rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        step_x, step_y = rng.integers(-3, 4, size=2)
        period = int(rng.integers(2, 7))
        stripes = ((rows * step_y + cols * step_x + 64) // period) % 2
        image = image + (stripes[..., None] * rng.integers(-30, 31, size=3)).astype(np.int32)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < difficulty.distractor_line_probability:
        ends = [int(value) for value in rng.integers(0, IMAGE_SIZE, size=4)]
        colour = tuple(int(value) for value in rng.integers(0, 256, size=3))
        ImageDraw.Draw(picture).line(ends, fill=colour, width=int(rng.integers(1, 3)))
    return picture


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Integer Rec.601 luma (weights x1000) so contrast checks stay exact."""
    return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) // 1000


def glyph_colour(rng: np.random.Generator, background_luma: int, difficulty: Difficulty) -> np.ndarray:
    colour = rng.integers(0, 256, size=3)
    for _ in range(8):
        if abs(int(luminance(colour)) - background_luma) >= difficulty.min_contrast:
            break
        colour = rng.integers(0, 256, size=3)
    return colour.astype(np.int32)


def render_sample(rng: np.random.Generator, class_index: int, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> np.ndarray:
    """One 32x32x3 uint8 image of `class_index`; the generator's draw order is part of the
    dataset definition, so reordering the calls below changes every image."""
    coverage = warped_glyph(rng, class_index, difficulty)[..., None]
    clutter = np.asarray(background(rng, difficulty), dtype=np.int32)
    colour = glyph_colour(rng, int(luminance(clutter).mean()), difficulty)
    composed = (clutter * (255 - coverage) + colour * coverage + 127) // 255
    amplitude = int(rng.integers(0, difficulty.max_noise_amplitude + 1))
    noise = rng.integers(-amplitude, amplitude + 1, size=composed.shape)
    return np.clip(composed + noise, 0, 255).astype(np.uint8)
