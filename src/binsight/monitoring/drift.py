"""Drift of a window of served photos against the model's baseline, with a known false-alarm rate.

One two-sample statistic per signal: Kolmogorov-Smirnov for each scalar (brightness, sharpness,
confidence, ...), the population stability index for the predicted-count mix, and the maximum mean
discrepancy (RBF kernel, median-distance bandwidth) for the photo embeddings. A statistic alone says
nothing about whether it is large; its threshold is set from the baseline's own variability: many
random windows of the same size are drawn from the baseline and compared with the rest of it, and the
threshold is the (1 - alpha / signals) quantile of those statistics. A window of photos like the
baseline's then raises any alarm with probability at most about alpha (Bonferroni over signals).
A signal that never varied in the baseline (every photo from one camera at one size) has no
variability to learn from; there the share of other values is compared with 3/n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel

from binsight.monitoring.baseline import Baseline

NULL_DRAWS = 200


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    reference, current = np.sort(reference), np.sort(current)
    grid = np.concatenate([reference, current])
    below_ref = np.searchsorted(reference, grid, side="right") / len(reference)
    below_cur = np.searchsorted(current, grid, side="right") / len(current)
    return float(np.abs(below_ref - below_cur).max())


def psi(reference: np.ndarray, current: np.ndarray, classes: int, floor: float = 1e-4) -> float:
    """Population stability index of two categorical samples (counts 0..classes-1). Shares are floored
    rather than smoothed by a count, so identical mixes score 0 whatever the sample sizes."""
    expected = np.maximum(np.bincount(reference, minlength=classes) / len(reference), floor)
    actual = np.maximum(np.bincount(current, minlength=classes) / len(current), floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    # Differences, not |a|^2 + |b|^2 - 2ab: that form cancels catastrophically for close points.
    # float32 and row blocks keep the temporaries small (the server runs this beside inference).
    total = 0.0
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    for start in range(0, len(a32), 64):
        distances = ((a32[start : start + 64, None, :] - b32[None, :, :]) ** 2).sum(-1)
        total += float(np.exp(-distances / (2 * bandwidth**2)).sum(dtype=np.float64))
    return total


def mmd2(
    reference: np.ndarray, current: np.ndarray, bandwidth: float, reference_term: float | None = None
) -> float:
    """Unbiased squared maximum mean discrepancy with an RBF kernel. `reference_term`, the mean
    off-diagonal kernel value within `reference`, may be passed in when it is reused."""
    n, m = len(reference), len(current)
    if reference_term is None:
        reference_term = (_kernel_sum(reference, reference, bandwidth) - n) / (n * (n - 1))
    within_current = (_kernel_sum(current, current, bandwidth) - m) / (m * (m - 1))
    across = _kernel_sum(reference, current, bandwidth) / (n * m)
    return float(reference_term + within_current - 2 * across)


def median_bandwidth(points: np.ndarray) -> float:
    sample = points[:300]
    distances = np.sqrt(np.maximum(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1), 0))
    positive = distances[distances > 0]
    return float(np.median(positive)) if positive.size else 1.0


def _share_unlike(reference: np.ndarray, current: np.ndarray) -> float:
    """Share of `current` unlike the constant `reference` (to the precision the baseline keeps)."""
    return float(np.mean(~np.isclose(current, reference[0], rtol=1e-6, atol=1e-3)))


@dataclass(frozen=True)
class SignalDrift:
    signal: str
    statistic: float
    threshold: float
    test: str

    @property
    def drifted(self) -> bool:
        return self.statistic > self.threshold


@dataclass
class DriftResult:
    window: int  # photos in the window
    signals: list[SignalDrift] = field(default_factory=list)
    alpha: float = 0.01
    start: str = ""
    end: str = ""

    @property
    def drifted(self) -> list[str]:
        return [s.signal for s in self.signals if s.drifted]

    @property
    def status(self) -> Literal["ok", "drift"]:
        return "drift" if self.drifted else "ok"

    def report(self) -> WindowReport:
        return WindowReport(
            window=self.window,
            start=self.start,
            end=self.end,
            status=self.status,
            drifted=self.drifted,
            alpha=self.alpha,
            signals={
                s.signal: SignalReport(
                    statistic=round(s.statistic, 6),
                    threshold=round(s.threshold, 6),
                    test=s.test,
                    drifted=s.drifted,
                )
                for s in self.signals
            },
        )


class SignalReport(BaseModel):
    statistic: float
    threshold: float
    test: str
    drifted: bool


class WindowReport(BaseModel):
    """One window's drift verdict as `/v1/traffic`, `monitor.json` and the report show it."""

    window: int  # photos in the window
    start: str
    end: str
    status: Literal["ok", "drift"]
    drifted: list[str]
    alpha: float
    signals: dict[str, SignalReport]


class Collecting(BaseModel):
    """The live watch before its first full window."""

    status: Literal["collecting"] = "collecting"
    photos: int
    window: int


class DriftOff(BaseModel):
    status: str  # why the server watches no drift


@dataclass(frozen=True)
class Window:
    """Served photos to compare: scalar signals, predicted class indices, embeddings (may be empty)."""

    scalars: dict[str, np.ndarray]
    predicted: np.ndarray
    embeddings: np.ndarray
    start: str = ""
    end: str = ""

    @property
    def size(self) -> int:
        return len(self.predicted)


class DriftDetector:
    """Thresholds are drawn once per window size and reused; the baseline never changes."""

    def __init__(self, baseline: Baseline, alpha: float = 0.01, seed: int = 0) -> None:
        self.baseline, self.alpha, self.seed = baseline, alpha, seed
        # Embeddings are compared in units of the baseline's own spread per dimension, so a model whose
        # photos differ little in absolute terms is watched as closely as one whose photos differ a lot.
        embeddings = baseline.embeddings
        self._centre = embeddings.mean(axis=0) if embeddings.size else np.zeros(0)
        self._scale = embeddings.std(axis=0) + 1e-12 if embeddings.size else np.ones(0)
        self._reference_embeddings = self._standardise(embeddings)
        self.bandwidth = median_bandwidth(self._reference_embeddings) if embeddings.shape[1] else 1.0
        self._thresholds: dict[int, dict[str, float]] = {}
        self._reference_term: float | None = None

    def _standardise(self, embeddings: np.ndarray) -> np.ndarray:
        return (embeddings - self._centre) / self._scale if embeddings.shape[1] else embeddings

    def _tests(self) -> dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], float], np.ndarray]]:
        tests: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], float], np.ndarray]] = {}
        for name, values in self.baseline.scalars.items():
            if not np.isfinite(values).all():
                continue
            if np.ptp(values) > 0:
                tests[name] = ("ks", ks_statistic, values)
            else:  # one fixed camera: every photo the same size, say; any other value is news
                tests[name] = ("constant", _share_unlike, values)
        classes = len(self.baseline.classes)
        tests["predicted_count"] = ("psi", lambda a, b: psi(a, b, classes), self.baseline.predicted)
        if self.baseline.embeddings.shape[1]:
            tests["embedding"] = ("mmd", lambda a, b: mmd2(a, b, self.bandwidth), self._reference_embeddings)
        return tests

    def thresholds(self, window: int) -> dict[str, float]:
        if window not in self._thresholds:
            n = self.baseline.size
            if window >= n:
                raise ValueError(f"a window of {window} photos needs a baseline of more than {window}")
            rng = np.random.default_rng(self.seed)
            draws = [rng.permutation(n) for _ in range(NULL_DRAWS)]
            tests = self._tests()
            level = 1 - self.alpha / len(tests)
            self._thresholds[window] = {
                name: (
                    # No variability to learn from: a share of other values the baseline could have
                    # missed (3/n, the "rule of three" upper bound) is tolerated, more is drift.
                    3.0 / n
                    if test == "constant"
                    else float(
                        np.quantile([statistic(values[d[window:]], values[d[:window]]) for d in draws], level)
                    )
                )
                for name, (test, statistic, values) in tests.items()
            }
        return self._thresholds[window]

    def check(self, current: Window) -> DriftResult:
        size = min(current.size, self.baseline.size - 1)
        thresholds = self.thresholds(size)
        result = DriftResult(size, alpha=self.alpha, start=current.start, end=current.end)
        for name, (test, statistic, reference) in self._tests().items():
            if name == "predicted_count":
                values = current.predicted
            elif name == "embedding":
                values = self._standardise(current.embeddings)
                if self._reference_term is None:  # the baseline's own term, computed once
                    n = len(reference)
                    total = _kernel_sum(reference, reference, self.bandwidth)
                    self._reference_term = (total - n) / (n * (n - 1))
                result.signals.append(
                    SignalDrift(
                        name,
                        mmd2(reference, values[-size:], self.bandwidth, self._reference_term),
                        thresholds[name],
                        test,
                    )
                )
                continue
            else:
                observed = current.scalars.get(name)
                if observed is None or not np.isfinite(observed).all():
                    continue
                values = observed
            result.signals.append(
                SignalDrift(name, statistic(reference, values[-size:]), thresholds[name], test)
            )
        return result
