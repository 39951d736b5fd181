"""Drift monitoring on real ABID photos: does traffic like the baseline stay quiet, and does shifted
traffic raise the alarm on the signal that moved?

The model is exported as binsight does (its baseline: the validation photos through the serving path).
Windows of --window photos then go through the same path on the engine the server would pick:
- the test split's photos, unchanged: --repeats random windows, to estimate the false-alarm rate
  (the design's target: at most --alpha per window);
- the same photos darker, blurred, half-size, recompressed at JPEG quality 30;
- synthetic bins (binsight's demo generator), i.e. another dataset.

Run: .venv/bin/python benchmarks/bench_monitor.py --checkpoint RUN/best.pt --data DATA [--window 200]
(RUN and DATA from benchmarks/bench_accuracy.py: runs/binsight is the lite0 recipe, data-1to5 the split)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from binsight.data.split import load_split
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.export.onnx import ExportConfig, export
from binsight.inference.runtime import load_counter
from binsight.monitoring.baseline import Baseline, observe_photos
from binsight.monitoring.drift import DriftDetector
from binsight.monitoring.watch import window_of

os.environ.setdefault("BINSIGHT_PROGRESS", "0")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bacc/runs/binsight/best.pt"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/bacc/data-1to5"))
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--backend", default="auto", help="serving engine (auto: what binsight serve picks)")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    if not args.checkpoint.is_file() or not (args.data / "splits").is_dir():
        print(
            "SKIP: needs a trained checkpoint and its dataset (run bench_accuracy.py first)", file=sys.stderr
        )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        export(ExportConfig(checkpoint=args.checkpoint, out=model, data=args.data))
        counter = load_counter(model, backend=args.backend, precision=args.precision)
        assert counter.info.baseline is not None
        baseline = Baseline.from_json(counter.info.baseline)
        photos = [args.data / r["image"] for r in load_split(args.data, "test")]
        test_seen = observe_photos(counter, [p.read_bytes() for p in photos])
        synthetic_root = Path(tmp) / "synth"
        generate_dataset(synthetic_root, SynthConfig(n_images=args.window, image_size=256, seed=1, workers=2))
        synthetic = sorted((synthetic_root / "images").glob("*.jpg"))

        detector = DriftDetector(baseline, args.alpha)
        window = min(args.window, baseline.size // 2)
        print(
            f"model {counter.info.arch} on {counter.runtime.backend} {counter.runtime.precision}; baseline "
            f"{baseline.size} validation photos; windows of {window}; alpha {args.alpha}\n"
        )
        rng = np.random.default_rng(0)
        alarms: Counter[str] = Counter()
        for _ in range(args.repeats):
            chosen = rng.choice(len(test_seen), size=window, replace=False)
            result = detector.check(window_of([test_seen[i] for i in chosen]))
            alarms.update(result.drifted or ["(none)"])
        false_alarms = args.repeats - alarms["(none)"]
        print(
            f"unchanged test photos: {false_alarms} of {args.repeats} random windows raised an alarm "
            f"({false_alarms / args.repeats:.0%}; design: at most about {args.alpha:.0%}); "
            f"signals: {dict(alarms)}\n"
        )
        # A random sample: the split lists photos grouped by count, and its first rows are a real shift.
        sample = rng.choice(len(photos), size=window, replace=False)
        originals = [Image.open(photos[i]) for i in sample]
        shifts: dict[str, Callable[[Image.Image], bytes]] = {
            "darker (brightness x0.6)": lambda im: jpeg(ImageEnhance.Brightness(im).enhance(0.6)),
            "blurred (Gaussian, radius 2)": lambda im: jpeg(im.filter(ImageFilter.GaussianBlur(2))),
            "half size": lambda im: jpeg(im.resize((im.width // 2, im.height // 2))),
            "recompressed at JPEG quality 30": lambda im: jpeg(im, quality=30),
        }
        rows = [("unchanged (a random window)", [test_seen[i] for i in sample])]
        rows += [
            (name, observe_photos(counter, [shift(im) for im in originals])) for name, shift in shifts.items()
        ]
        rows.append(
            ("synthetic bins (another dataset)", observe_photos(counter, [p.read_bytes() for p in synthetic]))
        )
        names = [s.signal for s in detector.check(window_of(rows[0][1])).signals]
        print("| traffic | status | signals over threshold (statistic / threshold) |")
        print("| --- | --- | --- |")
        for name, seen in rows:
            result = detector.check(window_of(seen[:window]))
            moved = ", ".join(
                f"{s.signal} {s.statistic / s.threshold:.1f}x" for s in result.signals if s.drifted
            )
            print(f"| {name} | {result.status} | {moved or '-'} |")
        print(f"\nsignals watched: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
