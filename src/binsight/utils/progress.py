"""Progress bars that show rate and ETA on a terminal and stay quiet in logs and CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("BINSIGHT_PROGRESS") in {"0", "1"}:
        return os.environ["BINSIGHT_PROGRESS"] == "1"
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        smoothing=0.1,
        disable=not progress_enabled(),
    )


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    with bar(total, desc, unit) as progress:
        for item in items:
            yield item
            progress.update(1)
