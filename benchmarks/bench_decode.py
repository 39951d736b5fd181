"""Decode + resize of real ABID photos to the model input: Pillow (draft mode, as binsight serves) against
libjpeg-turbo through simplejpeg (DCT-domain scaling, optional: `pip install simplejpeg`).

Single thread, the same photos, each path ending in the same uint8 (H, W, 3) array at the model's size.
The baseline is binsight's path (`binsight.imaging.decode_image` + `resize_to`) in the same run.

Run: .venv/bin/python benchmarks/bench_decode.py [--abid ../shared/abid] [--n 400]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from binsight.imaging import decode_image, resize_to

HERE = Path(__file__).resolve().parent


def rate(decode: Callable[[bytes], np.ndarray], bodies: list[bytes]) -> float:
    for body in bodies[:20]:
        decode(body)
    started = time.perf_counter()
    for body in bodies:
        decode(body)
    return len(bodies) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--abid", type=Path, default=HERE.parent.parent / "shared" / "abid")
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    bodies = [p.read_bytes() for p in sorted((args.abid / "images").glob("*.jpg"))[: args.n]]
    if not bodies:
        print(f"SKIP: no real ABID photos at {args.abid}", file=sys.stderr)
        return 0
    print(f"{len(bodies)} real ABID JPEGs, one thread, images/s (ratio vs binsight's Pillow path)")
    print("| input | Pillow draft + bilinear (binsight) | simplejpeg (libjpeg-turbo) + Pillow bilinear |")
    print("| --- | --- | --- |")
    for size in ((224, 224), (224, 304), (112, 152)):
        height, width = size

        def pillow(body: bytes, size: tuple[int, int] = size) -> np.ndarray:
            return np.asarray(resize_to(decode_image(body, size), size))

        row = [f"{height}x{width}", f"{rate(pillow, bodies):.0f}"]
        try:
            import simplejpeg

            def turbo(body: bytes, height: int = height, width: int = width) -> np.ndarray:
                pixels = simplejpeg.decode_jpeg(body, min_height=height, min_width=width)
                return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))

            base = float(row[1])
            turbo_rate = rate(turbo, bodies)
            row.append(f"{turbo_rate:.0f} ({turbo_rate / base:.2f}x)")
        except ImportError:
            row.append("not installed")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
