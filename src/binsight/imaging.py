"""Image decoding and model-input preparation shared by training, evaluation and the server.

Evaluation and serving must see identical pixels, so both go through `decode_image` (JPEG draft mode)
and a Pillow bilinear resize to the model's input size. Inputs need not be square: a size is either
one side (a square) or (height, width), the order tensors use.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

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


def to_model_input(
    image: Image.Image,
    size: Size,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """CHW float32, normalised: what the exported model takes (one image of a batch)."""
    return normalise(np.asarray(resize_to(image, size)), mean, std)


def normalise(
    rgb: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """HWC uint8 RGB at the model's input size -> CHW float32, normalised; a batch (NHWC) -> NCHW."""
    scaled = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    channels_first = (2, 0, 1) if rgb.ndim == 3 else (0, 3, 1, 2)
    return np.ascontiguousarray(normalised.transpose(channels_first))
