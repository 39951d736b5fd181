"""`binsight monitor`: drift of captured traffic against the model's baseline, window by window, as
JSON for machines and an HTML report with plots for people."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from binsight.errors import BinsightError
from binsight.monitoring.baseline import Baseline, Seen
from binsight.monitoring.drift import DriftDetector, DriftResult, WindowReport
from binsight.monitoring.signals import SCALAR_SIGNALS
from binsight.monitoring.watch import window_of
from binsight.reporting.html import HtmlReport
from binsight.utils.records import JsonRecord

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """The captured records a monitor can use, and how many it could not, by reason."""

    seen: list[Seen]
    skipped: dict[str, int]


def _finite(value: Any) -> float:
    number = float(value)  # TypeError/ValueError for non-numbers; bools are numbers to Python: refused
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _parse(
    record: object, classes: tuple[int, ...], signal_names: tuple[str, ...], embedding_dim: int
) -> Seen:
    if not isinstance(record, dict) or not isinstance(record.get("signals"), dict):
        raise KeyError("signals")
    signals = {name: _finite(record["signals"][name]) for name in signal_names}
    confidence = _finite(record["confidence"])
    if not 0.0 <= confidence <= 1.0:
        raise ValueError("confidence out of range")
    signals["confidence"] = confidence
    count = record["count"]
    if isinstance(count, bool) or not isinstance(count, int) or count not in classes:
        raise ValueError("count not a class of this model")
    raw = record.get("embedding", [])
    if not isinstance(raw, list) or len(raw) != embedding_dim:
        raise ValueError("embedding of another length")
    embedding = np.asarray([_finite(v) for v in raw], dtype=np.float64)
    return Seen(signals, classes.index(count), embedding, str(record.get("time", "")))


def read_capture(
    folder: Path,
    classes: tuple[int, ...],
    model_version: str | None = None,
    signal_names: tuple[str, ...] = SCALAR_SIGNALS,
    embedding_dim: int | None = None,
) -> Capture:
    """Captured requests of one model version that carry every signal, oldest first. Lines that cannot
    be used are skipped and counted, never fatal: a capture folder is written by servers (and whoever
    else can write to it), and records of another model version (after a hot reload) have other
    classes, embeddings and baselines."""
    if not folder.is_dir():
        raise BinsightError(f"no capture folder at {folder}", hint="serve with --capture-dir FOLDER")
    seen: list[Seen] = []
    skipped: Counter[str] = Counter()
    for path in sorted(folder.glob("capture-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:  # each line parsed once: capture folders hold up to 20 files of 64 MB
                record = json.loads(line)
            except (ValueError, RecursionError):
                skipped["unreadable line"] += 1
                continue
            if model_version:
                if not isinstance(record, dict):
                    skipped["unreadable line"] += 1
                    continue
                if record.get("model_version") not in (None, model_version):
                    skipped["other model version"] += 1
                    continue
            try:
                dim = embedding_dim if embedding_dim is not None else len(record.get("embedding", []))
                seen.append(_parse(record, classes, signal_names, dim))
            except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
                skipped["incomplete or invalid record"] += 1
    seen.sort(key=lambda s: s.time)
    return Capture(seen, dict(skipped))


@dataclass
class MonitorResult:
    windows: list[DriftResult]
    photos: int
    window: int
    alpha: float

    @property
    def latest(self) -> DriftResult | None:
        return self.windows[-1] if self.windows else None

    def summary(self) -> MonitorSummary:
        latest = self.latest
        return MonitorSummary(
            photos=self.photos,
            window=self.window,
            alpha=self.alpha,
            status=latest.status if latest else "too few photos",
            drifted_in_latest=latest.drifted if latest else [],
            windows=[w.report() for w in self.windows],
        )


class MonitorSummary(JsonRecord):
    """`monitor.json`: every window of a capture folder against the baseline, the latest first in mind."""

    photos: int
    window: int
    alpha: float
    status: str
    drifted_in_latest: list[str]
    windows: list[WindowReport]


def monitor(baseline: Baseline, seen: list[Seen], window: int, alpha: float) -> MonitorResult:
    window = max(10, min(window, baseline.size // 2))
    detector = DriftDetector(baseline, alpha)
    # Consecutive windows, the last one ending at the newest photo.
    ends = list(range(len(seen), window - 1, -window))[::-1]
    results = [detector.check(window_of(seen[end - window : end])) for end in ends]
    return MonitorResult(results, len(seen), window, alpha)


def write_report(result: MonitorResult, baseline: Baseline, seen: list[Seen], out: Path) -> None:
    import matplotlib.pyplot as plt

    from binsight.utils.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    result.summary().write(out / "monitor.json")
    report = HtmlReport(f"binsight monitor: {result.photos} captured photos, windows of {result.window}")
    latest = result.latest
    if latest is None:
        report.paragraph(f"Too few captured photos with signals for one window of {result.window}.", "warn")
        report.write(out / "report.html")
        return
    verdict = (
        f"Drift in the latest window: {', '.join(latest.drifted)}."
        if latest.drifted
        else "No drift in the latest window."
    )
    report.paragraph(
        f"{verdict} Each window of {result.window} photos is compared with the model's baseline "
        f"({baseline.size} validation photos, {baseline.source}); a window like the baseline raises "
        f"any alarm with probability about {result.alpha:g}.",
        "warn" if latest.drifted else None,
    )
    report.table(
        ["signal", "test", "statistic", "threshold", "drifted"],
        [(s.signal, s.test, s.statistic, s.threshold, "yes" if s.drifted else "") for s in latest.signals],
    )

    names = [s.signal for s in latest.signals]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in names:
        ratios = [
            next((s.statistic / s.threshold for s in w.signals if s.signal == name and s.threshold > 0), 0.0)
            for w in result.windows
        ]
        ax.plot(range(1, len(ratios) + 1), ratios, marker="o", label=name)
    ax.axhline(1.0, color="C3", linestyle="--", label="alarm threshold")
    ax.set_xlabel("window (oldest first)")
    ax.set_ylabel("statistic / threshold")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "drift_over_time.png")
    report.figure(out / "drift_over_time.png", "Each signal's drift statistic over windows, 1 = alarm")

    recent = window_of(seen[-result.window :])
    scalars = [n for n in names if n in baseline.scalars]
    if scalars:
        columns = 4
        rows = (len(scalars) + columns - 1) // columns
        fig, axes = plt.subplots(rows, columns, figsize=(12, 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, scalars, strict=False):
            ax.hist(baseline.scalars[name], bins=20, alpha=0.5, density=True, label="baseline")
            ax.hist(recent.scalars[name], bins=20, alpha=0.5, density=True, label="latest window")
            ax.set_title(name + (" (drift)" if name in latest.drifted else ""), fontsize=9)
        for ax in list(axes.flat)[len(scalars) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        save_figure(fig, out / "signals.png")
        report.figure(out / "signals.png", "Baseline against the latest window, per signal")
    report.write(out / "report.html")


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capture_dir: Path = Field(description="the server's --capture-dir")
    model: Path = Field(description="the served ONNX file (it holds the baseline)")
    out: Path = Field(Path("runs/monitor"), description="output folder")
    window: int = Field(200, ge=10, description="photos per window")
    alpha: float = Field(
        0.01, gt=0.0, lt=1.0, description="chance that a window like the baseline raises an alarm"
    )
    fail_on_drift: bool = Field(
        False, description="exit 3 when the latest window drifted, 4 when too few records to judge"
    )


@dataclass
class MonitorRun:
    result: MonitorResult
    skipped: dict[str, int]
    model_version: str


def run_monitor(config: MonitorConfig) -> MonitorRun:
    """Captured traffic of the model's own version against its baseline, window by window; writes
    monitor.json, report.html and the plots."""
    from binsight.inference.runtime import load_counter

    counter = load_counter(config.model, backend="onnxruntime")
    if not counter.info.baseline:
        raise BinsightError(
            f"{config.model} has no monitoring baseline", hint="export it again with this binsight version"
        )
    baseline = Baseline.from_json(counter.info.baseline)
    capture = read_capture(
        config.capture_dir,
        tuple(counter.info.classes),
        counter.info.version,
        tuple(name for name in baseline.scalars if name != "confidence"),
        baseline.embeddings.shape[1],
    )
    result = monitor(baseline, capture.seen, config.window, config.alpha)
    write_report(result, baseline, capture.seen, config.out)
    return MonitorRun(result, capture.skipped, counter.info.version)
