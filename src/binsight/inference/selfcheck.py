"""Every engine proves a model file on the CPU it runs on before it serves a single request.

`binsight export` stores a reference set in the file: a few validation photos as the model takes them
(uint8 pixels at its input size, PNG-compressed) and the fp32 PyTorch model's probabilities for them.
When an engine loads the file it runs those photos and compares its answers with the stored ones:
the share of photos whose most likely count agrees, and the largest difference in any probability.
Reduced precision is judged by its own tolerance (bf16 keeps 8 bits of mantissa; int8 kernels without
VNNI can saturate and lose whole counts), and fp32 by a tight one, so the check also catches a wrong
preprocessing or a broken runtime. The result travels with the loaded model to `/v1/model`, `/metrics`
and the log; a failed check makes the loader fall back or refuse (see `runtime.load_counter`).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from binsight.imaging import Preprocess


@dataclass(frozen=True)
class Tolerance:
    min_agreement: float  # share of reference photos whose argmax must match the fp32 model's
    max_prob_diff: float  # largest allowed |p_engine - p_fp32| over every class of every photo


# Stated, and tested: a file within these tolerances serves; one outside falls back or is refused.
TOLERANCES = {
    "fp32": Tolerance(1.0, 2e-3),
    "bf16": Tolerance(0.9, 0.08),
    "int8": Tolerance(0.9, 0.12),
}


@dataclass(frozen=True)
class ReferenceSet:
    pixels: np.ndarray  # (n, height, width, 3) uint8, the model's input size
    probabilities: np.ndarray  # (n, classes): the fp32 PyTorch model's answers

    def to_json(self) -> str:
        photos = []
        for image in self.pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG", optimize=True)
            photos.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return json.dumps(
            {"photos_png": photos, "probabilities": np.round(self.probabilities, 7).tolist()},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ReferenceSet:
        document = json.loads(text)
        pixels = np.stack(
            [
                np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB"))
                for p in document["photos_png"]
            ]
        )
        return cls(pixels, np.asarray(document["probabilities"], dtype=np.float64))


@dataclass(frozen=True)
class SelfCheck:
    """How one engine, at one precision, on this CPU, answered the reference photos."""

    engine: str  # "openvino/bf16"
    photos: int
    agreement: float
    max_prob_diff: float
    tolerance: Tolerance
    passed: bool

    def summary(self) -> str:
        return (
            f"{self.engine}: {self.agreement:.0%} of {self.photos} reference photos agree with fp32, "
            f"largest probability difference {self.max_prob_diff:.4f} (tolerance: "
            f"{self.tolerance.min_agreement:.0%} and {self.tolerance.max_prob_diff})"
        )


def run_self_check(
    predict: object, reference: ReferenceSet, preprocess: Preprocess, engine: str, precision: str
) -> SelfCheck:
    """`predict`: the engine's (N, 3, H, W) float32 -> (N, classes) probabilities."""
    inputs = preprocess.normalise(reference.pixels)
    got = np.asarray(predict(inputs), dtype=np.float64)  # type: ignore[operator]
    expected = reference.probabilities
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    difference = float(np.abs(got - expected).max())
    tolerance = TOLERANCES[precision]
    passed = agreement >= tolerance.min_agreement and difference <= tolerance.max_prob_diff
    return SelfCheck(f"{engine}/{precision}", len(expected), agreement, difference, tolerance, passed)
