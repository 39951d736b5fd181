"""The README's first command: `binsight demo`, the whole job on synthetic bins, through the real entry
point (small: 100 photos, so it takes about a minute on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from binsight.cli import main
from binsight.training.results import EvaluationReport, TrainSummary


@pytest.mark.slow
def test_the_demo_runs_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-images", "100"]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{step}/8]" in printed for step in range(1, 9)), printed
    assert TrainSummary.read(out / "model" / "history.json").epochs_run >= 1
    assert EvaluationReport.read(out / "model" / "eval-test" / "metrics.json").n == 10
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.int8.onnx").stat().st_size > 0
    audit = json.loads((out / "audit" / "audit_evaluation.json").read_text())
    assert audit["bins"] == 10 and set(audit["caught_at_budget"]) == {"5%", "10%", "20%"}
    for report in (out / "model" / "eval-test" / "report.html", out / "audit" / "report.html"):
        assert "<html" in report.read_text().lower()
