"""The zoo's offline dataset: 62-class rendered characters (0-9, A-Z, a-z), 32x32 RGB.

We cannot download ImageNet, so the zoo trains on images rendered from the fonts inside the
matplotlib wheel. Each sample has its own generator seeded by (seed, split, index), so any subset
can be rendered alone, in any order or in parallel, and still match the full split bit for bit;
splits never share a generator, so they are disjoint by construction.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tools.zoo import fonts, render

DATASET_NAME = "zoo-chars62"
DATASET_VERSION = 2
"""Bump when rendering changes, so stale caches are not read back."""

SPLIT_SIZES = {"train": 24_000, "test": 5_000, "calib": 512}
SPLIT_CODES = {"train": 0, "test": 1, "calib": 2}

NUM_CLASSES = len(fonts.CLASSES)
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def sample_generator(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index, DATASET_VERSION])


def label_of(index: int) -> int:
    """Classes cycle with the index, so every prefix of a split is balanced to within one."""
    return index % NUM_CLASSES


def render_range(split: str, start: int, stop: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images for indices [start, stop)."""
    images = [render.render_sample(sample_generator(seed, split, index), label_of(index)) for index in range(start, stop)]
    return np.stack(images) if images else np.zeros((0, render.IMAGE_SIZE, render.IMAGE_SIZE, 3), np.uint8)


def render_split(split: str, count: int, seed: int = 0, workers: int = 1) -> np.ndarray:
    if workers <= 1:
        return render_range(split, 0, count, seed)
    bounds = np.linspace(0, count, workers * 4 + 1).astype(int)
    with ProcessPoolExecutor(workers) as pool:
        chunks = pool.map(render_range, [split] * (len(bounds) - 1), bounds[:-1], bounds[1:], [seed] * (len(bounds) - 1))
        return np.concatenate(list(chunks))


def normalise(images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, (pixel/255 - mean) / std: what every zoo model takes as `input`."""
    scaled = images_uint8_nhwc.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((scaled - PIXEL_MEAN) / PIXEL_STD).transpose(0, 3, 1, 2))


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONNXREPQ_CACHE", Path.home() / ".cache" / "onnxrepq")) / "zoo-data"


def cache_path(cache_dir: Path, split: str, count: int, seed: int) -> Path:
    return cache_dir / f"{DATASET_NAME}-v{DATASET_VERSION}-{split}-seed{seed}-n{count}.npz"


def load_or_render(split: str, count: int, seed: int, cache_dir: Path | None, workers: int) -> np.ndarray:
    if cache_dir is None:
        return render_split(split, count, seed, workers)
    path = cache_path(cache_dir, split, count, seed)
    if path.exists():
        return np.load(path)["images"]
    images = render_split(split, count, seed, workers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, images=images)
    temporary.replace(path)  # atomic, so a concurrent reader never sees half a file
    return images


def make_split(
    split: str,
    count: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    cache_dir: Path | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 NCHW normalised, labels int64) for the first `count` samples of `split`.

    The cache lives in cache_dir, else $ONNXREPQ_CACHE/zoo-data, else ~/.cache/onnxrepq/zoo-data.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    count = SPLIT_SIZES[split] if count is None else count
    directory = (Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
    images = load_or_render(split, count, seed, directory, workers)
    labels = np.array([label_of(index) for index in range(count)], dtype=np.int64)
    return normalise(images), labels


def split_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the exact bytes of a split, the dataset's identity in tests and model cards."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def describe(seed: int = 0) -> dict:
    """What a model card says about the data it was trained and measured on."""
    return {
        "name": DATASET_NAME,
        "version": DATASET_VERSION,
        "seed": seed,
        "split_sizes": dict(SPLIT_SIZES),
        "classes": fonts.CLASSES,
        "input": "float32 NCHW 1x3x32x32, (rgb/255 - 0.5) / 0.25",
        "fonts": [path.name for path in fonts.text_fonts()],
        "generated_by": "tools/zoo/data.py: per-sample numpy Generator seeded by (seed, split, index, version); "
        "glyph from a matplotlib TrueType font, random affine (rotation, shear, scale, shift), "
        "Gaussian blur, colour-blob/stripe background, distractor line, integer noise",
    }
