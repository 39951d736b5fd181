"""What each pipeline step decided, typed: `state.json` is a `PipelineState`, written after every step
and read back by a resumed run, which then skips the steps already recorded."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from binsight.errors import BinsightError
from binsight.training.results import BestEpoch
from binsight.utils.records import JsonRecord


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelState(BaseModel):
    """Where the people's recounts a run trained on came from (the label store's state at ingest)."""

    recounts_file: str
    recounts_sha256: str
    photos_recounted: int
    store: dict[str, int] | None = None  # items, recounts and schema version of the label store


class Ingested(_Step):
    labels: LabelState | None = None
    added_images: int
    indexed: int
    skipped: int
    data_fingerprint: str
    test_fingerprint: str


class Trained(_Step):
    checkpoint: str
    best: BestEpoch


class Exported(_Step):
    onnx: str
    max_abs_diff_vs_pytorch: float


class SplitMetrics(_Step):
    """A model's metrics on the fixed test split (the fingerprint proves which split)."""

    accuracy: float
    off_by_one_accuracy: float
    mae: float
    rmse: float
    ece: float
    n: int
    split_fingerprint: str


class Evaluated(_Step):
    candidate: SplitMetrics
    production: SplitMetrics | None = None
    production_version: str | None = None


class Decision(_Step):
    promote: bool
    reason: str


class Registered(_Step):
    version: str


class Promoted(_Step):
    promoted: bool
    production: str | None


class PipelineState(JsonRecord):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    ingest: Ingested | None = None
    train: Trained | None = None
    export: Exported | None = None
    evaluate: Evaluated | None = None
    decide: Decision | None = None
    # Not "register": pydantic models are ABCs, whose `register` the field would shadow. Runs recorded
    # before the rename still read.
    registration: Registered | None = Field(None, validation_alias=AliasChoices("registration", "register"))
    promote: Promoted | None = None

    @classmethod
    def resume(cls, path: Path, run_id: str) -> PipelineState:
        if not path.exists():
            return cls(run_id=run_id)
        try:
            # Runs recorded before the state was typed hold no run id: it is their folder's name.
            return cls.model_validate({"run_id": run_id, **json.loads(path.read_text())})
        except (OSError, ValueError) as exc:
            raise BinsightError(
                f"cannot read the pipeline state {path}: {exc}", hint="use a new --run-id"
            ) from None
