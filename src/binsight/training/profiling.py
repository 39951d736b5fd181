"""torch.profiler over a few training steps: a trace for Perfetto and a summary table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from binsight.training.config import TrainConfig
from binsight.training.results import EpochStats
from binsight.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def make_profiler(config: TrainConfig, device: torch.device, out: Path) -> Any:
    """Profile `profile_steps` steps after one warm-up step; the trace is written when they end."""
    from torch.profiler import ProfilerActivity, profile, schedule

    def write_trace(profiler: Any) -> None:
        folder = out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(folder / "trace.json"))
        sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profiler.binsight_table = profiler.key_averages().table(sort_by=sort_key, row_limit=15)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=config.profile_steps, repeat=1),
        on_trace_ready=write_trace,
    )


def write_profile_summary(profiler: Any, out: Path, epoch_stats: EpochStats) -> None:
    table = getattr(profiler, "binsight_table", "(the epoch ended before the profiled steps did)")
    summary = (
        f"data loading: {100 * epoch_stats.data_wait_fraction:.1f}% of epoch time spent waiting "
        f"for batches; {epoch_stats.train_images_per_second:.1f} images/s\n\n"
        f"Top operators by self time over {out / 'profile' / 'trace.json'} "
        f"(open it in Perfetto or chrome://tracing):\n{table}\n"
    )
    atomic_write_text(out / "profile" / "summary.txt", summary)
    log.info("profile summary in %s", out / "profile" / "summary.txt")
