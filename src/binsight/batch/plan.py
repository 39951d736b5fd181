"""A batch run's plan (`plan.json`): everything that decides its shards' contents, so that a resumed
run scores exactly what the first one started, and a run into a folder holding another's results is
refused instead of mixing the two."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from binsight.batch.config import BatchConfig
from binsight.batch.sources import Manifest
from binsight.batch.stages import ScorerSettings
from binsight.errors import BinsightError
from binsight.inference.engines import Backend, EnginePrecision
from binsight.inference.verdict import VerdictSettings
from binsight.utils.io import sha256_file
from binsight.utils.records import JsonRecord

PLAN, SHARDS = "plan.json", "shards"


class ScoringPlan(BaseModel):
    """The settings that change a photo's answer (threads only change the speed)."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend
    precision: EnginePrecision
    version: str | None
    judge: bool
    verdicts: VerdictSettings


class BatchPlan(JsonRecord):
    """`plan.json`: everything that decides a shard's contents; a resumed run must match it exactly."""

    model_config = ConfigDict(extra="forbid")

    source: str | None
    photos: int
    manifest_sha256: str
    shard_size: int
    model_sha256: str
    scoring: ScoringPlan


def make_plan(
    source: str, config: BatchConfig, manifest: Manifest, model: Path, settings: ScorerSettings
) -> BatchPlan:
    rows = hashlib.sha256()
    for image, recorded, record_source in zip(
        manifest.images, manifest.recorded, manifest.record_sources, strict=True
    ):
        rows.update(f"{image}\t{recorded}\t{record_source}\n".encode())
    for rejected in manifest.rejected:  # an edit that breaks a row changes the input too
        rows.update(json.dumps(rejected, sort_keys=True).encode())
    return BatchPlan(
        source=source,
        photos=len(manifest),
        manifest_sha256=rows.hexdigest(),
        shard_size=config.shard_size,
        model_sha256=sha256_file(model),
        scoring=ScoringPlan(
            backend=settings.backend,
            precision=settings.precision,
            version=settings.version,
            judge=settings.judge,
            verdicts=settings.verdicts,
        ),
    )


def previous_plan(out: Path) -> BatchPlan | None:
    """The plan of the run already in `out`, if any (one from an older binsight reads as none)."""
    path = out / PLAN
    try:
        return BatchPlan.read(path) if path.is_file() else None
    except BinsightError:
        return None


def check_plan(out: Path, plan: BatchPlan, restart: bool) -> None:
    if restart:
        shutil.rmtree(out / SHARDS, ignore_errors=True)
    elif (out / PLAN).is_file():
        previous = previous_plan(out)
        if previous is None:
            raise BinsightError(
                f"{out} holds results of a run whose plan this binsight cannot read",
                hint="use another --out, or --restart to discard those results",
            )
        now, then = plan.model_dump(), previous.model_dump()
        differs = sorted(k for k in now if then[k] != now[k])
        if {"manifest_sha256", "photos"} & set(differs):
            raise BinsightError(
                f"the photos or recorded quantities of {plan.source} changed since the run in {out} "
                f"started ({previous.photos} photos then, {plan.photos} now)",
                hint="--restart to score the new input from scratch, or a new --out",
            )
        if differs:
            raise BinsightError(
                f"{out} holds results of another run (it differs in {', '.join(differs)})",
                hint="use another --out, or --restart to discard those results",
            )
    plan.write(out / PLAN)
