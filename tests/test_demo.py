"""The README's first command: `binsight demo`, the whole job on synthetic bins, run as the command it
is (small: 100 photos and 2 fine-tuning epochs, so it takes about half a minute on 2 cores). In its own
process: training leaves thread pools and engines behind that the tests after it need not share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from binsight.training.results import EvaluationReport, TrainSummary


@pytest.mark.slow
@pytest.mark.parametrize("training", ["fine-tune", "frozen"])  # the two modes `auto` chooses between
def test_the_demo_runs_every_stage(tmp_path: Path, training: str) -> None:
    out = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "binsight",
        "demo",
        "--out",
        str(out),
        "--n-images",
        "100",
        "--training",
        training,
        "--epochs",  # fine-tuning only: every stage runs after 2 as after the default 6
        "2",
    ]
    env = dict(os.environ, BINSIGHT_PROGRESS="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert all(f"[{step}/8]" in printed for step in range(1, 9)), printed
    assert ("frozen features" in printed) == (training == "frozen")
    assert TrainSummary.read(out / "model" / "history.json").epochs_run >= 1
    assert EvaluationReport.read(out / "model" / "eval-test" / "metrics.json").n == 10
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.int8.onnx").stat().st_size > 0
    audit = json.loads((out / "audit" / "audit_evaluation.json").read_text())
    assert audit["bins"] == 10 and set(audit["caught_at_budget"]) == {"5%", "10%", "20%"}
    for report in (out / "model" / "eval-test" / "report.html", out / "audit" / "report.html"):
        assert "<html" in report.read_text().lower()
