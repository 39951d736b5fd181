"""`binsight pipeline`: ingest new data, retrain, evaluate candidate and production on the same test
split, register the candidate, and promote it only if it is better.

Each step records its outcome in ``WORK/RUN_ID/state.json`` and is skipped when re-run with the same
run id, so a pipeline killed at any point is finished by running the same command again (training
itself resumes from its last checkpoint). Servers following the registry alias pick up a promoted
model by hot reload.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from binsight.data import IMAGES_DIR, METADATA_DIR
from binsight.data.index import build_index
from binsight.data.split import SPLIT_DIR, SplitConfig, SplitRecord, fingerprint, write_splits
from binsight.errors import BinsightError
from binsight.pipeline.state import (
    Decision,
    Evaluated,
    Exported,
    Ingested,
    LabelState,
    PipelineState,
    Promoted,
    Registered,
    SplitMetrics,
    Trained,
)
from binsight.registry import Registry
from binsight.reporting.html import HtmlReport
from binsight.training.metrics import Metric
from binsight.utils.io import atomic_write_json, sha256_file
from binsight.utils.redact import SecretUrl

log = logging.getLogger(__name__)
Step = TypeVar("Step", bound=BaseModel)

# The test metrics a candidate is compared on (its loss depends on the head, so it is not one of them).
COMPARED = (Metric.ACCURACY, Metric.OFF_BY_ONE_ACCURACY, Metric.MAE, Metric.RMSE)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="dataset directory (ABID layout); re-indexed and split each run")
    registry: str = Field(description="model registry: a folder or s3://bucket/prefix")
    work_dir: Path = Field(Path("runs/pipeline"), description="where each run keeps its steps and state")
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="re-use to resume a crashed run (default: a timestamp); letters, digits, _ . -",
    )
    new_data: str | None = Field(None, description="folder or s3://bucket/prefix with new images + metadata")
    s3_endpoint_url: SecretUrl | None = Field(None, description="S3-compatible endpoint (default AWS)")
    train_config: Path | None = Field(None, description="JSON training config (e.g. from `binsight tune`)")
    train_overrides: dict[str, Any] = Field(
        default_factory=dict, description='training settings on top, e.g. {"pretrained": false}'
    )
    refit: bool = Field(
        False,
        description="after the validated run, train its settings again on train+val up to its best epoch and "
        "make that the candidate: a third more photos for the served model, twice the training time",
    )
    metric: Metric = Field(Metric.ACCURACY, description="the metric the candidate must improve")
    margin: float = Field(0.005, ge=0.0, description="how much better the candidate must be on `metric`")
    tolerance: float = Field(0.02, ge=0.0, description="how much worse it may be on the other metrics")
    alias: str = Field(
        "production", pattern=r"^[a-z][a-z0-9_-]{0,40}$", description="registry alias to promote"
    )
    split_seed: int = Field(
        0, description="seed of the first split; a dataset already split keeps its own seed and fractions"
    )
    recounts: Path | None = Field(
        None, description="people's recounts (`binsight recheck export`): they outrank the records"
    )
    recheck_storage: SecretUrl | None = Field(
        None, description="the label store the recounts came from, whose state the run records"
    )


def existing_split_config(data: Path, seed: int) -> SplitConfig:
    """The settings the dataset was split with, so re-splitting after new data keeps every old
    image where it was (the fixed test set stays fixed); `seed` only for a dataset never split."""
    recorded = data / SPLIT_DIR / "split.json"
    if recorded.is_file():
        try:
            return SplitRecord.read(recorded).config
        except BinsightError as exc:
            raise BinsightError(f"{recorded} is not a readable split record: {exc}") from None
    return SplitConfig(seed=seed)


def _ingest_folder(source: Path, data: Path) -> int:
    added = 0
    for folder, suffix in ((IMAGES_DIR, ".jpg"), (METADATA_DIR, ".json")):
        (data / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / folder).glob(f"*{suffix}")):
            target = data / folder / path.name
            if not target.exists():
                partial = target.with_name(f".{target.name}.part")
                shutil.copyfile(path, partial)
                partial.replace(target)
                added += folder == IMAGES_DIR
    return added


def ingest(config: PipelineConfig) -> Ingested:
    added = 0
    if config.new_data:
        if config.new_data.startswith("s3://"):
            from binsight.data.download import DownloadConfig, download

            bucket, _, prefix = config.new_data[5:].partition("/")
            prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            report = download(
                DownloadConfig(
                    out=config.data,
                    bucket=bucket,
                    endpoint_url=config.s3_endpoint_url,
                    images_prefix=f"{prefix}{IMAGES_DIR}/",
                    metadata_prefix=f"{prefix}{METADATA_DIR}/",
                )
            )
            added = report.downloaded
        else:
            source = Path(config.new_data)
            if not (source / IMAGES_DIR).is_dir():
                raise BinsightError(
                    f"{source} has no {IMAGES_DIR}/ folder", hint="new data must use the ABID layout"
                )
            added = _ingest_folder(source, config.data)
    index = build_index(config.data, recounts=config.recounts)
    summary = write_splits(config.data, existing_split_config(config.data, config.split_seed))
    labels = None
    if config.recounts is not None:
        store = None
        if config.recheck_storage:
            from binsight.recheck.store import LabelStore

            store = LabelStore(config.recheck_storage).state()
        labels = LabelState(
            recounts_file=str(config.recounts),
            recounts_sha256=sha256_file(config.recounts),
            photos_recounted=sum(1 for r in index.rows if r["count_source"] == "recount"),
            store=store,
        )
    return Ingested(
        labels=labels,
        added_images=added,
        indexed=len(index.rows),
        skipped=len(index.skipped),
        data_fingerprint=fingerprint(index.rows),
        test_fingerprint=summary.splits["test"].fingerprint,
    )


def compare(
    candidate: Mapping[str, float],
    production: Mapping[str, float] | None,
    metric: Metric,
    margin: float,
    tolerance: float,
) -> Decision:
    """Promote when the candidate beats production on `metric` by `margin` and is not worse than
    `tolerance` on any other metric."""
    if production is None:
        return Decision(promote=True, reason="no production model yet")
    gain = metric.gain(candidate[metric], production[metric])
    if gain < margin:
        return Decision(promote=False, reason=f"{metric} gain {gain:+.4f} is below the margin {margin}")
    for other in COMPARED:
        if other == metric:
            continue
        loss = -other.gain(candidate[other], production[other])
        if loss > tolerance:
            return Decision(promote=False, reason=f"{other} is worse by {loss:.4f} (tolerance {tolerance})")
    return Decision(promote=True, reason=f"{metric} improves by {gain:+.4f}")


class Pipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.run_id = config.run_id or time.strftime("%Y%m%d-%H%M%S")
        self.dir = config.work_dir / self.run_id
        self.state_path = self.dir / "state.json"
        self.state = PipelineState.resume(self.state_path, self.run_id)
        self.registry = Registry(config.registry, config.s3_endpoint_url)

    def step(self, name: str, action: Callable[[], Step]) -> Step:
        done: Step | None = getattr(self.state, name)
        if done is not None:
            log.info("pipeline %s: %s already done", self.run_id, name)
            return done
        log.info("pipeline %s: %s", self.run_id, name)
        result = action()
        setattr(self.state, name, result)
        self.state.write(self.state_path)
        return result

    def _train(self) -> Trained:
        from binsight.training.config import load_config
        from binsight.training.engine import train

        overrides = {**self.config.train_overrides, "data": self.config.data, "out": self.dir / "train"}
        summary = train(load_config(self.config.train_config, overrides))
        if not self.config.refit:
            return Trained(checkpoint=str(self.dir / "train" / "best.pt"), best=summary.best)
        # The candidate is judged on the fixed test split like any other; `best` stays the validated
        # run's, the only validation figure there is.
        train(load_config(None, {"out": self.dir / "refit"}, refit=self.dir / "train"))
        return Trained(checkpoint=str(self.dir / "refit" / "best.pt"), best=summary.best)

    def _export(self, trained: Trained) -> Exported:
        from binsight.export.onnx import ExportConfig, export

        report = export(
            ExportConfig(
                checkpoint=Path(trained.checkpoint), out=self.dir / "model.onnx", data=self.config.data
            )
        )
        return Exported(onnx=report.onnx, max_abs_diff_vs_pytorch=report.max_abs_diff_vs_pytorch)

    def _evaluate(self, trained: Trained) -> Evaluated:
        from binsight.training.evaluate import EvaluateConfig, evaluate

        keys = ("accuracy", "off_by_one_accuracy", "mae", "rmse", "ece", "n", "split_fingerprint")
        candidate = evaluate(
            EvaluateConfig(
                checkpoint=Path(trained.checkpoint),
                data=self.config.data,
                split="test",
                out=self.dir / "eval-candidate",
                workers=0,
            )
        )
        result = Evaluated(candidate=SplitMetrics.model_validate(candidate.model_dump(include=set(keys))))
        current = self.registry.alias(self.config.alias)
        if current is not None:
            version = current.version
            checkpoint = self.registry.fetch(version, "model.pt", self.dir / "production" / "model.pt")
            production = evaluate(
                EvaluateConfig(
                    checkpoint=checkpoint,
                    data=self.config.data,
                    split="test",
                    out=self.dir / "eval-production",
                    workers=0,
                )
            )
            result.production = SplitMetrics.model_validate(production.model_dump(include=set(keys)))
            result.production_version = version
        return result

    def _register(
        self, ingested: Ingested, trained: Trained, exported: Exported, evaluated: Evaluated
    ) -> Registered:
        checkpoint = Path(trained.checkpoint)
        config = json.loads((checkpoint.parent / "config.json").read_text())
        version = self.registry.register(
            checkpoint,
            Path(exported.onnx),
            evaluated.candidate.model_dump(),
            {
                "run_id": self.run_id,
                "config": config,
                "data_fingerprint": ingested.data_fingerprint,
                "test_fingerprint": ingested.test_fingerprint,
                "pipeline_dir": str(self.dir),
            },
        )
        self.registry.set_alias("candidate", version, f"pipeline run {self.run_id}")
        return Registered(version=version)

    def _promote(self, decision: Decision, registered: Registered, evaluated: Evaluated) -> Promoted:
        if not decision.promote:
            return Promoted(promoted=False, production=evaluated.production_version)
        self.registry.set_alias(self.config.alias, registered.version, decision.reason)
        return Promoted(promoted=True, production=registered.version)

    def run(self) -> PipelineState:
        self.dir.mkdir(parents=True, exist_ok=True)
        ingested = self.step("ingest", lambda: ingest(self.config))
        trained = self.step("train", self._train)
        exported = self.step("export", lambda: self._export(trained))
        evaluated = self.step("evaluate", lambda: self._evaluate(trained))
        production = evaluated.production.model_dump() if evaluated.production else None
        decision = self.step(
            "decide",
            lambda: compare(
                evaluated.candidate.model_dump(),
                production,
                self.config.metric,
                self.config.margin,
                self.config.tolerance,
            ),
        )
        registered = self.step("registration", lambda: self._register(ingested, trained, exported, evaluated))
        promoted = self.step("promote", lambda: self._promote(decision, registered, evaluated))
        self._report(ingested, evaluated, decision, registered, promoted)
        return self.state

    def _report(
        self,
        ingested: Ingested,
        evaluated: Evaluated,
        decision: Decision,
        registered: Registered,
        promoted: Promoted,
    ) -> None:
        report = HtmlReport(f"binsight pipeline {self.run_id}")
        verdict = "promoted" if promoted.promoted else "not promoted"
        report.paragraph(
            f"Candidate {registered.version} {verdict}: {decision.reason}.",
            "ok" if promoted.promoted else "warn",
        )
        candidate = evaluated.candidate.model_dump()
        production = evaluated.production.model_dump() if evaluated.production else {}
        rows = [
            (k, candidate[k], production.get(k))
            for k in ("accuracy", "off_by_one_accuracy", "mae", "rmse", "ece", "n")
        ]
        report.table(
            ["metric (test split)", "candidate", f"production {evaluated.production_version or '–'}"],
            rows,
        )
        report.paragraph(
            f"Data: {ingested.indexed} images ({ingested.added_images} new), "
            f"test split fingerprint {ingested.test_fingerprint}."
        )
        report.figure(self.dir / "eval-candidate" / "confusion_matrix.png", "Candidate confusion matrix")
        report.figure(self.dir / "eval-production" / "confusion_matrix.png", "Production confusion matrix")
        report.write(self.dir / "comparison.html")
        atomic_write_json(
            self.dir / "comparison.json",
            {
                "evaluation": evaluated.model_dump(mode="json"),
                "decision": decision.model_dump(mode="json"),
                "promote": promoted.model_dump(mode="json"),
            },
        )


def run_pipeline(config: PipelineConfig) -> PipelineState:
    """One run of the loop: ingest, train, export, evaluate, decide, register, promote (resumable)."""
    return Pipeline(config).run()
