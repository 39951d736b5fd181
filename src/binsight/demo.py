"""The main job on the embedded default: synthetic bins, end to end, with no network and no GPU."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from binsight.data.index import build_index
from binsight.data.split import SplitConfig, write_splits
from binsight.data.stats import dataset_stats, format_stats
from binsight.data.synth import SynthConfig, generate_dataset

log = logging.getLogger(__name__)


def run_demo(out: Path, n_images: int = 1500, seed: int = 0) -> None:
    data_dir = out / "data"
    started = time.perf_counter()
    written = generate_dataset(data_dir, SynthConfig(n_images=n_images, seed=seed))
    print(f"[1/4] synthesized {written} bin photos in {time.perf_counter() - started:.1f}s -> {data_dir}")
    index = build_index(data_dir)
    print(f"[2/4] indexed {len(index.rows)} images ({len(index.skipped)} skipped)")
    summary = write_splits(data_dir, SplitConfig(seed=seed))
    sizes = ", ".join(f"{k} {v['images']}" for k, v in summary["splits"].items())
    print(f"[3/4] split: {sizes}")
    stats = dataset_stats(data_dir, out / "stats")
    print("[4/4] dataset statistics:")
    print(format_stats(stats))
    print(f"done in {time.perf_counter() - started:.1f}s; plots in {out / 'stats'}")
