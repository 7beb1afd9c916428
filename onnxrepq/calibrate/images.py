"""Calibration from a folder of .png/.jpg files: decode, resize, normalise, lay out as the model wants.

Pillow is imported only when a folder of images is read, so the package works without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np

from ..errors import CalibrationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImagePreprocess:
    """How one image file becomes one sample: ``(x * scale - mean) / std`` per channel.

    Resizing: with ``resize_shorter`` the shorter side is scaled to it first (aspect kept); then
    ``center_crop`` cuts the centre ``size`` out, otherwise the image is stretched to ``size``.
    Without ``resize_shorter`` and with ``center_crop``, the image is scaled just enough to cover
    ``size`` before the crop. ``size`` None takes (H, W) from the model's input shape.
    """
    size: Optional[tuple[int, int]] = None      # (H, W)
    resize_shorter: Optional[int] = None
    center_crop: bool = False
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)   # in the units after ``scale``
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR") or self.layout not in ("NCHW", "NHWC"):
            raise CalibrationError(f"image channel order must be RGB or BGR and layout NCHW or NHWC,"
                                   f" got {self.channel_order!r} and {self.layout!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise CalibrationError(f"image size must be two positive integers (H, W), got {self.size!r}")
        if len(self.mean) != len(self.std) or not all(s != 0 for s in self.std):
            raise CalibrationError("image mean and std need the same length and a non-zero std")

    def load(self, file: Path, size: tuple[int, int], channels: int) -> np.ndarray:
        """One sample (no batch axis), float32, in this spec's layout."""
        from PIL import Image

        with Image.open(file) as image:
            image = self._resized(image.convert("L" if channels == 1 else "RGB"), size)
            pixels = np.asarray(image, dtype=np.float32).reshape(size[0], size[1], -1) * np.float32(self.scale)
        if self.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if len(mean) not in (1, pixels.shape[-1]):
            raise CalibrationError(f"image mean/std have {len(mean)} values for {pixels.shape[-1]} channels")
        pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels)

    def _resized(self, image, size: tuple[int, int]):
        from PIL import Image

        height, width = size
        if self.resize_shorter:
            ratio = self.resize_shorter / min(image.width, image.height)
        elif self.center_crop:
            ratio = max(height / image.height, width / image.width)
        else:
            return image.resize((width, height), Image.BILINEAR)
        image = image.resize((max(round(image.width * ratio), 1), max(round(image.height * ratio), 1)),
                             Image.BILINEAR)
        if not self.center_crop:
            return image.resize((width, height), Image.BILINEAR)
        if image.width < width or image.height < height:
            raise CalibrationError(f"resize_shorter {self.resize_shorter} leaves {image.width}x{image.height},"
                                   f" smaller than the crop {width}x{height}")
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def is_image_folder(source: Any) -> bool:
    """A folder with images and no .npy/.npz (those keep their meaning as prepared samples)."""
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        return False
    folder = Path(source)
    return bool(image_files(folder)) and not any(p.suffix in (".npy", ".npz") for p in folder.iterdir())


class ImageFolder:
    """A re-iterable stream of single-sample feeds read from the images of ``folder``."""

    def __init__(self, folder: str | Path, preprocess: Optional[ImagePreprocess], specs: Sequence):
        if len(specs) != 1:
            raise CalibrationError("a folder of images fits single-input models only")
        self.folder, self.spec = Path(folder), specs[0]
        self.preprocess = preprocess or ImagePreprocess()
        shape = self.spec.shape
        if len(shape) != 4:
            raise CalibrationError(f"images need a rank-4 input; {self.spec.name!r} has rank {len(shape)}")
        channel_axis, spatial = (1, shape[2:4]) if self.preprocess.layout == "NCHW" else (3, shape[1:3])
        self.channels = shape[channel_axis] or 3
        self.size = self.preprocess.size or tuple(spatial)
        if None in self.size:
            raise CalibrationError(f"input {self.spec.name!r} has free height/width; give the image size"
                                   " (--image-size H W or [calibration.images] size)")
        self.files = image_files(self.folder)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            try:
                sample = self.preprocess.load(file, self.size, self.channels)
            except CalibrationError:
                raise
            except Exception as exc:
                raise CalibrationError(f"cannot read image {file}: {str(exc).splitlines()[0][:200]}") from None
            yield {self.spec.name: sample[None]}
