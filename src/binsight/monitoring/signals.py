"""What is measured about each photo the model sees, cheaply enough to do on every request.

Measured on the photo as the model receives it (decoded, resized to the input size, uint8), plus the
original's size and JPEG quality: a camera that moved, a lens that fogged, a lighting change or a
new compression setting each moves one of these.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SCALAR_SIGNALS = ("width", "height", "kilobytes", "brightness", "contrast", "sharpness", "jpeg_quality")
ANSWER_SIGNALS = ("confidence",)

# The IJG (libjpeg) standard luminance table at quality 50; encoders scale it by quality.
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
     92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip


def jpeg_quality(image: Image.Image) -> float:
    """The IJG quality (1-100) a JPEG's luminance table corresponds to; NaN for other formats."""
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables:
        return float("nan")
    scale = 100.0 * float(np.mean(tables[0])) / float(np.mean(_IJG_LUMA))
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return float(np.clip(quality, 1.0, 100.0))


def photo_signals(
    rgb: np.ndarray, width: int, height: int, size_bytes: int, quality: float
) -> dict[str, float]:
    """`rgb`: the model-input-sized HWC uint8 photo; the rest describe the original."""
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    laplacian = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    return {
        "width": float(width),
        "height": float(height),
        "kilobytes": size_bytes / 1000.0,
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        # Log of the Laplacian's variance: blur lowers it by orders of magnitude.
        "sharpness": float(np.log1p(laplacian.var())),
        "jpeg_quality": quality,
    }
