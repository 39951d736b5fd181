"""Image decoding and model-input preparation: `Preprocess`, the one definition every stage uses.

Inputs need not be square: a size is either one side (a square) or (height, width), the order
tensors use.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from binsight.card import ModelCard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Size = int | tuple[int, int]


def as_hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ImageTooLargeError(ValueError):
    """More pixels than the configured limit (a decompression bomb, or just too big)."""


class UnsupportedImageError(ValueError):
    """Not a JPEG, PNG or WebP file (by its first bytes)."""


# The formats binsight reads, told by their magic bytes before Pillow sees the data: Pillow alone would
# decode whatever format it recognises (BMP, TIFF, SGI, DDS, ...), and for EPS it would start
# Ghostscript on the client's bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")


def sniff_format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_image(
    source: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int | None = None
) -> Image.Image:
    """Open without decoding pixels; the format is checked by its magic bytes and the pixel limit
    from the header alone."""
    target: str | os.PathLike[str] | BinaryIO
    if isinstance(source, bytes):
        head, target = source[:12], io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:  # Pillow opens (and closes) the path itself below
            head = handle.read(12)
        target = source
    else:
        start = source.tell()
        head = source.read(12)
        source.seek(start)
        target = source
    if sniff_format(head) is None:
        raise UnsupportedImageError("not a JPEG, PNG or WebP image (by its first bytes)")
    image = Image.open(target, formats=ACCEPTED_FORMATS)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels, over the limit of {max_pixels}")
    return image


def draft_rgb(image: Image.Image, size: Size) -> Image.Image:
    """Decode to RGB with each side at least the target's, whatever the photo's aspect; JPEGs decode at
    1/2, 1/4 or 1/8 scale when that still leaves enough pixels."""
    height, width = as_hw(size)
    # draft() picks the smallest scale at which both sides stay >= the requested box: exactly what a
    # squash-resize to (width, height) needs.
    image.draft("RGB", (width, height))
    return image.convert("RGB")


def decode_image(
    source: str | os.PathLike[str] | bytes | BinaryIO, size: Size, max_pixels: int | None = None
) -> Image.Image:
    return draft_rgb(open_image(source, max_pixels), size)


def resize_to(image: Image.Image, size: Size) -> Image.Image:
    # A plain resize, no centre crop: objects at the bin's edges count too.
    height, width = as_hw(size)
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Preprocess:
    """How a model sees a photo, defined once: decode (magic-byte check, JPEG draft mode), squash to
    the input size with Pillow's bilinear resize, scale to 0-1 and normalise. Training (before its
    augmentation), evaluation, export's reference photos, the server and batch runs all call this, so
    a model sees the same numbers everywhere (tests/test_real_photo_pieces.py holds them equal)."""

    input_hw: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_card(cls, card: ModelCard) -> Preprocess:
        return cls(card.input_hw, tuple(card.mean), tuple(card.std))

    def decode(
        self,
        source: str | os.PathLike[str] | bytes | BinaryIO,
        max_pixels: int | None = None,
        observe: Callable[[Image.Image], None] | None = None,
    ) -> Image.Image:
        """The photo as RGB, decoded at the smallest JPEG scale still covering the input. `observe`
        sees the opened file before decoding (the monitoring signals read its size and JPEG quality)."""
        image = open_image(source, max_pixels)
        if observe is not None:
            observe(image)
        return draft_rgb(image, self.input_hw)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """HWC uint8 RGB at the input size: what caches and the batch decode stage keep."""
        return np.asarray(resize_to(image, self.input_hw))

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HWC (or NHWC) -> float32 CHW (or NCHW), the exported graph's input."""
        return normalise(pixels, self.mean, self.std)

    def __call__(
        self, source: str | os.PathLike[str] | bytes | BinaryIO, max_pixels: int | None = None
    ) -> np.ndarray:
        return self.normalise(self.pixels(self.decode(source, max_pixels)))


def normalise(
    rgb: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """HWC uint8 RGB at the model's input size -> CHW float32, normalised; a batch (NHWC) -> NCHW."""
    scaled = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    channels_first = (2, 0, 1) if rgb.ndim == 3 else (0, 3, 1, 2)
    return np.ascontiguousarray(normalised.transpose(channels_first))
