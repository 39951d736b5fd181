"""Drift of the most recent served photos, checked in the background by the server itself.

The service hands every answered photo to `DriftWatch.add` (cheap: a few floats into a ring buffer);
every `interval_s` the newest `window` photos are compared with the model's baseline off the event
loop, and the result feeds `/metrics` and the `/traffic` page.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from binsight.monitoring.baseline import Baseline, Seen
from binsight.monitoring.drift import Collecting, DriftDetector, DriftResult, Window, WindowReport


class DriftWatch:
    def __init__(self, baseline: Baseline, window: int, alpha: float) -> None:
        # The null needs photos left over beyond the window: cap the window at half the baseline.
        self.window = max(10, min(window, baseline.size // 2))
        self.detector = DriftDetector(baseline, alpha)
        self._recent: collections.deque[Seen] = collections.deque(maxlen=self.window)
        self._lock = threading.Lock()
        self.latest: DriftResult | None = None

    def add(self, seen: Seen) -> None:
        with self._lock:
            self._recent.append(seen)

    def check(self) -> DriftResult | None:
        with self._lock:
            recent = list(self._recent)
        if len(recent) < self.window:
            return None
        self.latest = self.detector.check(window_of(recent))
        return self.latest

    def summary(self) -> WindowReport | Collecting:
        if self.latest is None:
            return Collecting(photos=len(self._recent), window=self.window)
        return self.latest.report()


def window_of(seen: list[Seen]) -> Window:
    names = seen[0].signals.keys()
    return Window(
        {name: np.array([s.signals.get(name, np.nan) for s in seen], dtype=np.float64) for name in names},
        np.array([s.predicted for s in seen]),
        np.stack([s.embedding for s in seen]) if seen[0].embedding.size else np.zeros((len(seen), 0)),
        seen[0].time,
        seen[-1].time,
    )
