"""Figures written as PNG. Matplotlib runs headless (Agg): servers and CI have no display."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from binsight.utils.io import atomic_write_bytes


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def bar_chart(
    series: Mapping[str, Mapping[int, int]], title: str, xlabel: str, path: str | os.PathLike[str]
) -> None:
    """Grouped bars: one group per x value, one bar per series (e.g. per split)."""
    xs = sorted({x for counts in series.values() for x in counts})
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(xs) + 3), 3.6))
    width = 0.8 / max(1, len(series))
    for k, (name, counts) in enumerate(series.items()):
        positions = np.arange(len(xs)) + (k - (len(series) - 1) / 2) * width
        ax.bar(positions, [counts.get(x, 0) for x in xs], width=width, label=name)
    ax.set_xticks(np.arange(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def histograms(values: Mapping[str, Sequence[float]], title: str, path: str | os.PathLike[str]) -> None:
    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values), 3.2), squeeze=False)
    for ax, (name, data) in zip(axes[0], values.items(), strict=True):
        ax.hist(data, bins=30, color="#4477aa")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)


def line_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike[str]) -> None:
    """One panel per metric (e.g. loss, accuracy), one line per series (train, val)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], curves.items(), strict=True):
        for name, ys in lines.items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def history_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> None:
    """Loss, accuracy and MAE per epoch from a training history (history.json's rows)."""
    line_curves(
        {
            "loss": {"train": [h["train_loss"] for h in history], "val": [h["val_loss"] for h in history]},
            "val accuracy": {
                "exact": [h["val_accuracy"] for h in history],
                "off by one": [h["val_off_by_one_accuracy"] for h in history],
            },
            "val MAE": {"mae": [h["val_mae"] for h in history]},
        },
        path,
    )


def confusion_matrix_plot(
    matrix: np.ndarray, labels: Sequence[str], path: str | os.PathLike[str], title: str
) -> None:
    """Rows are true counts, columns predictions; colour is the row-normalised rate."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted count")
    ax.set_ylabel("true count")
    ax.set_title(title)
    save_figure(fig, path)
