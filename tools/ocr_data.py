"""Synthetic, deterministic OCR data for benchmarking the PP-OCR models offline.

Why synthetic: the bench must run without internet and give the same numbers on every machine,
so text lines and pages are rendered with PIL from matplotlib's bundled DejaVu fonts, driven by a
numpy Generator seeded per (split, task); calibration and evaluation never share a seed.

Preprocessing follows PaddleOCR's inference scripts (tools/infer/predict_rec.py, predict_cls.py,
predict_det.py): PaddleOCR reads images with cv2, so pixels reach the models in BGR order, and we
flip our RGB renders to BGR before normalising.
"""
import math
import string
import os
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SPLIT_SEEDS = {"calib": 1_001, "eval": 2_002}
TASK_SEEDS = {"rec": 11, "cls": 22, "det": 33}

REC_HEIGHT = 48
REC_WIDTH = 320  # PP-OCRv4 rec_image_shape [3, 48, 320]
CLS_WIDTH = 192  # ppocr mobile cls_image_shape [3, 48, 192]
DET_MEAN = (0.485, 0.456, 0.406)  # PaddleOCR applies these in this order to the BGR image
DET_STD = (0.229, 0.224, 0.225)

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf",
)
WORDS = (
    "the", "model", "quantize", "data", "report", "total", "price", "order", "invoice", "date",
    "name", "street", "city", "number", "page", "table", "value", "image", "text", "line",
    "paper", "office", "market", "north", "south", "river", "garden", "window", "station", "level",
    "green", "yellow", "orange", "silver", "winter", "summer", "travel", "ticket", "receipt", "account",
    "balance", "payment", "delivery", "service", "center", "school", "library", "museum", "hotel", "bank",
    "coffee", "bread", "water", "energy", "power", "signal", "system", "network", "server", "client",
)
PUNCTUATION = ".,:;-!?()/%&"
# Difficulty of rendered lines, tuned so FP32 PP-OCRv4 rec reads about 70% of them exactly:
# too easy and quantization damage never shows in exact match, too hard and FP32 is noise.
LINE_FONT_LOW, LINE_PAPER_LOW, LINE_INK_HIGH, LINE_BLUR_MAX, LINE_NOISE_MAX = 14, 140, 120, 2.0, 18.0


def split_rng(split: str, task: str) -> np.random.Generator:
    """One generator per (split, task), so adding a task never shifts another task's data."""
    return np.random.default_rng([SPLIT_SEEDS[split], TASK_SEEDS[task]])


def font_dir() -> str:
    import matplotlib
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=256)
def load_font(file_name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(font_dir(), file_name), size)


def random_word(rng: np.random.Generator) -> str:
    """A dictionary word (in one of three casings), a number, a date/time, or an alphanumeric code."""
    kind = rng.integers(0, 7)
    if kind <= 2:
        word = str(rng.choice(WORDS))
        word = (word, word.capitalize(), word.upper())[kind]
        return word + (str(rng.choice(list(PUNCTUATION))) if rng.random() < 0.25 else "")
    if kind == 3:
        return f"{rng.integers(0, 10_000)}" + ("" if rng.random() < 0.5 else f".{rng.integers(0, 100):02d}")
    if kind == 4:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}" if rng.random() < 0.5 \
            else f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    # Random codes keep the look-alikes (O/0, l/I/1) a dictionary cannot disambiguate.
    alphabet = list(string.ascii_letters + string.digits + "-./")
    return "".join(rng.choice(alphabet, size=int(rng.integers(3, 8))))


def random_text(rng: np.random.Generator) -> str:
    return " ".join(random_word(rng) for _ in range(int(rng.integers(1, 4))))


def add_noise(rng: np.random.Generator, image: Image.Image, sigma: float) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, size=(image.height, image.width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_line(rng: np.random.Generator, text: str) -> np.ndarray:
    """A tight crop of one text line, like a detector box: dark ink on a light, slightly tinted ground."""
    font = load_font(str(rng.choice(FONT_FILES)), int(rng.integers(LINE_FONT_LOW, 44)))
    left, top, right, bottom = font.getbbox(text)
    margin_x, margin_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    size = (right - left + 2 * margin_x, bottom - top + 2 * margin_y)
    background = tuple(int(v) for v in rng.integers(LINE_PAPER_LOW, 256) - rng.integers(0, 20, size=3))
    ink = tuple(int(v) for v in rng.integers(0, LINE_INK_HIGH) + rng.integers(0, 20, size=3))
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((margin_x - left, margin_y - top), text, font=font, fill=ink)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, LINE_BLUR_MAX))))
    return add_noise(rng, image, float(rng.uniform(1.0, LINE_NOISE_MAX)))


def render_lines(split: str, task: str, count: int, max_aspect: float) -> tuple[list[np.ndarray], list[str]]:
    """Draw lines until `count` fit within `max_aspect` (width/height), so none gets squeezed on resize."""
    rng = split_rng(split, task)
    images, texts = [], []
    while len(images) < count:
        text = random_text(rng)
        image = render_line(rng, text)
        if image.shape[1] / image.shape[0] <= max_aspect:
            images.append(image)
            texts.append(text)
    return images, texts


def resize_norm_line(image_rgb: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR resize_norm_img: height 48 keeping aspect, width capped, (x/255-0.5)/0.5, zero pad right."""
    height, original_width = image_rgb.shape[:2]
    resized_width = min(width, int(math.ceil(REC_HEIGHT * original_width / height)))
    resized = Image.fromarray(image_rgb[:, :, ::-1].copy()).resize((resized_width, REC_HEIGHT), Image.BILINEAR)
    normalized = (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    padded = np.zeros((3, REC_HEIGHT, width), dtype=np.float32)
    padded[:, :, :resized_width] = normalized
    return padded


def rec_split(split: str, count: int) -> tuple[np.ndarray, list[str]]:
    """PP-OCRv4 rec inputs (N, 3, 48, 320) float32 and their strings."""
    images, texts = render_lines(split, "rec", count, REC_WIDTH / REC_HEIGHT)
    return np.stack([resize_norm_line(image, REC_WIDTH) for image in images]), texts


def cls_split(split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Text-direction classifier inputs (N, 3, 48, 192); label 1 means the line is rotated 180 degrees."""
    images, _ = render_lines(split, "cls", count, CLS_WIDTH / REC_HEIGHT)
    labels = np.arange(count) % 2  # alternate, so both classes are always balanced
    turned = [np.ascontiguousarray(image[::-1, ::-1]) if label else image for image, label in zip(images, labels)]
    return np.stack([resize_norm_line(image, CLS_WIDTH) for image in turned]), labels


def textured_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour blotches (an upsampled coarse grid) plus a paper-like base tone."""
    base = rng.integers(150, 256, size=3).astype(np.float32)
    coarse = rng.normal(0.0, 25.0, size=(6, 6, 3)).astype(np.float32)
    blotches = np.stack([
        np.asarray(Image.fromarray(coarse[:, :, c]).resize((size, size), Image.BILINEAR)) for c in range(3)
    ], axis=2)
    return Image.fromarray(np.clip(base + blotches, 0, 255).astype(np.uint8))


def render_page(rng: np.random.Generator, size: int) -> np.ndarray:
    """Several lines of text at random positions, sizes and dark colours on a textured page."""
    page = textured_background(rng, size)
    draw = ImageDraw.Draw(page)
    for _ in range(int(rng.integers(3, 9))):
        font = load_font(str(rng.choice(FONT_FILES)), int(rng.integers(size // 30, size // 12)))
        text = random_text(rng)
        left, top, right, bottom = font.getbbox(text)
        x = int(rng.integers(0, max(1, size - (right - left))))
        y = int(rng.integers(0, max(1, size - (bottom - top))))
        ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
        draw.text((x - left, y - top), text, font=font, fill=ink)
    return add_noise(rng, page, float(rng.uniform(1.0, 5.0)))


def det_normalize(image_rgb: np.ndarray) -> np.ndarray:
    """PaddleOCR NormalizeImage on the BGR image (scale 1/255, ImageNet mean/std), then HWC -> CHW."""
    bgr = image_rgb[:, :, ::-1].astype(np.float32) / 255.0
    normalized = (bgr - np.array(DET_MEAN, np.float32)) / np.array(DET_STD, np.float32)
    return normalized.transpose(2, 0, 1).copy()


def det_split(split: str, count: int, size: int = 480) -> np.ndarray:
    """PP-OCRv4 det inputs (N, 3, size, size) float32; size must be a multiple of 32."""
    if size % 32:
        raise ValueError(f"det page size {size} is not a multiple of 32")
    rng = split_rng(split, "det")
    return np.stack([det_normalize(render_page(rng, size)) for _ in range(count)])


def rec_characters(model) -> list[str]:
    """Class i >= 1 is characters[i-1]; PaddleOCR appends ' ' last (use_space_char=True)."""
    text = next(prop.value for prop in model.metadata_props if prop.key == "character")
    return text.split("\n") + [" "]


def ctc_greedy_decode(probabilities: np.ndarray, characters: list[str]) -> str:
    """Best path per time step, collapse repeats, drop the blank (class 0)."""
    best = np.argmax(probabilities, axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return "".join(characters[i - 1] for i in best[keep] if i != 0)
