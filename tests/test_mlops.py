"""Registry, retrain-and-promote pipeline, audit, hyperparameter search and the web page."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import optuna
import pytest

from binsight.audit.evaluation import catch_curve, simulate_errors
from binsight.cli import main
from binsight.data.synth import SynthConfig, generate_dataset
from binsight.errors import BinsightError
from binsight.inference.runtime import load_counter
from binsight.pipeline.retrain import Pipeline, PipelineConfig, compare
from binsight.pipeline.state import Decision, PipelineState, Promoted
from binsight.registry import Registry
from binsight.serving.app import create_app
from binsight.serving.config import ServeConfig
from binsight.training.config import load_config
from binsight.training.metrics import Metric
from binsight.utils.io import read_csv
from tests.background import BackgroundServer

from .conftest import (
    launch_chromium,
    needs_chromium,
    post_jpeg,
    s3_client,
    use_test_credentials,
    wait_in_page,
)


def register_both(registry: Registry, trained: dict[str, Path]) -> list[str]:
    return [
        registry.register(
            trained[f"checkpoint_{n}"], trained[f"onnx_{n}"], {"accuracy": 0.5, "mae": 0.7}, {"note": n}
        )
        for n in ("a", "b")
    ]


def test_local_registry_versions_aliases_and_rollback(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    registry = Registry(tmp_path / "registry")
    assert register_both(registry, trained) == ["v0001", "v0002"]
    version = registry.get("v0002")
    assert version.meta["note"] == "b" and version.meta["version"] == "v0002" and "created" in version.meta
    # The version's record carries the model card the file does.
    assert version.meta["card"] == load_counter(trained["onnx_b"]).info.card.model_dump(mode="json")
    assert (tmp_path / "registry/versions/v0002/model.onnx").read_bytes() == trained["onnx_b"].read_bytes()
    registry.set_alias("production", "v0001")
    registry.set_alias("production", "v0002")
    assert registry.resolve("production") == "v0002"
    assert registry.rollback("production").version == "v0001"
    with pytest.raises(BinsightError, match="no earlier version"):
        registry.rollback("production")
    with pytest.raises(BinsightError, match="no complete version 'v0009'"):
        registry.set_alias("production", "v0009")
    with pytest.raises(BinsightError, match="no alias 'staging'"):
        registry.resolve("staging")

    assert main(["models", "promote", "v0002", "--registry", str(tmp_path / "registry")]) == 0
    assert main(["models", "list", "--registry", str(tmp_path / "registry")]) == 0
    listing = capsys.readouterr().out
    assert "v0001" in listing and "v0002" in listing and "production" in listing
    assert main(["models", "rollback", "--registry", str(tmp_path / "registry")]) == 0
    assert "rolled back to v0001" in capsys.readouterr().out


def test_s3_registry_same_scheme(
    trained: dict[str, Path], abid_bucket: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_test_credentials(monkeypatch)
    s3_client(abid_bucket["endpoint"]).create_bucket(Bucket="models")
    registry = Registry("s3://models/binsight", endpoint_url=abid_bucket["endpoint"])
    assert register_both(registry, trained) == ["v0001", "v0002"]
    registry.set_alias("production", "v0002")
    again = Registry("s3://models/binsight", endpoint_url=abid_bucket["endpoint"])
    assert again.versions() == ["v0001", "v0002"] and again.aliases() == {"production": "v0002"}
    fetched = again.fetch("v0002", "model.onnx", tmp_path / "m.onnx")
    assert fetched.read_bytes() == trained["onnx_b"].read_bytes()


def test_server_follows_a_registry_alias(trained: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    register_both(registry, trained)
    registry.set_alias("production", "v0001")
    config = ServeConfig(
        registry=str(tmp_path / "registry"), registry_cache=tmp_path / "cache", reload_interval_s=0.1
    )
    with BackgroundServer(create_app(config), config) as server:
        assert httpx.get(f"{server.url}/ping").json()["model_version"] == "v0001"
        registry.set_alias("production", "v0002")
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/ping").json()["model_version"] != "v0002":
            assert time.monotonic() < deadline, "the server did not follow the alias"
            time.sleep(0.1)
        body = next((trained["data"] / "images").glob("*.jpg")).read_bytes()
        answer = post_jpeg(f"{server.url}/invocations", body)
        assert answer.json()["model_version"] == "v0002"


def test_compare_promotes_only_a_real_improvement() -> None:
    production = {"accuracy": 0.60, "off_by_one_accuracy": 0.90, "mae": 0.50, "rmse": 0.80}
    better = {**production, "accuracy": 0.63}
    assert compare(better, production, Metric.ACCURACY, 0.01, 0.02).promote is True
    assert compare(better, production, Metric.ACCURACY, 0.05, 0.02).promote is False
    worse_elsewhere = {**better, "mae": 0.60}
    decision = compare(worse_elsewhere, production, Metric.ACCURACY, 0.01, 0.02)
    assert decision.promote is False and "mae" in decision.reason
    lower_mae = {**production, "mae": 0.40}
    assert compare(lower_mae, production, Metric.MAE, 0.05, 0.02).promote is True
    assert compare(better, None, Metric.ACCURACY, 0.01, 0.02) == Decision(
        promote=True, reason="no production model yet"
    )


def test_pipeline_registers_promotes_resumes_and_ingests(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data, ignore=shutil.ignore_patterns("splits", "index.csv", ".cache"))
    weak = {
        "arch": "mobilenet_v3_small",
        "pretrained": False,
        "image_size": 32,
        "epochs": 1,
        "batch_size": 16,
        "workers": 0,
        "tensorboard": False,
        "max_train_batches": 2,
        "seed": 0,
    }
    base = dict(
        data=data, registry=str(tmp_path / "registry"), work_dir=tmp_path / "work", train_overrides=weak
    )

    def broken_promote(self: Pipeline, *steps: object) -> dict:
        raise RuntimeError("killed between register and promote")

    monkeypatch.setattr(Pipeline, "_promote", broken_promote)
    with pytest.raises(RuntimeError):
        Pipeline(PipelineConfig(**base, run_id="first")).run()
    monkeypatch.undo()
    first = Pipeline(PipelineConfig(**base, run_id="first")).run()  # the same command, run again
    registry = Registry(tmp_path / "registry")
    assert registry.versions() == ["v0001"]  # registered once, not twice
    assert first.promote == Promoted(promoted=True, production="v0001")
    assert PipelineState.resume(tmp_path / "work/first/state.json", "first") == first
    assert registry.resolve("production") == "v0001" and registry.resolve("candidate") == "v0001"
    assert (tmp_path / "work/first/comparison.html").exists()

    new = tmp_path / "new"
    generate_dataset(new, SynthConfig(n_images=20, image_size=64, seed=9, start_index=5000, workers=1))
    second = Pipeline(PipelineConfig(**base, run_id="second", new_data=str(new))).run()
    assert second.ingest is not None and second.evaluate is not None and second.promote is not None
    assert second.ingest.added_images == 20 and second.ingest.indexed == 180
    # Same recipe, same seed: the candidate is no better, so production stays.
    assert second.evaluate.production_version == "v0001"
    assert second.promote.promoted is False and registry.resolve("production") == "v0001"
    assert registry.resolve("candidate") == "v0002"
    saved = json.loads((tmp_path / "work/second/comparison.json").read_text())
    assert saved["evaluation"]["candidate"]["n"] == saved["evaluation"]["production"]["n"]

    # A refit: the validated run's settings trained again on train+val up to its best epoch; that
    # model is exported, judged on the same test split and registered.
    refit = {**weak, "epochs": 2}
    third = Pipeline(PipelineConfig(**{**base, "train_overrides": refit}, run_id="third", refit=True)).run()
    assert third.train is not None and third.evaluate is not None
    assert third.train.checkpoint == str(tmp_path / "work/third/refit/best.pt")
    refit_config = json.loads((tmp_path / "work/third/refit/config.json").read_text())
    assert refit_config["fit_on"] == "train+val" and refit_config["stop_after"] == third.train.best.epoch
    assert registry.get("v0003").meta["config"]["fit_on"] == "train+val"
    assert third.evaluate.candidate.split_fingerprint == second.evaluate.candidate.split_fingerprint


def test_pipeline_state_recorded_before_it_was_typed_still_resumes(tmp_path: Path) -> None:
    old = {
        "ingest": {
            "added_images": 0,
            "indexed": 160,
            "skipped": 0,
            "data_fingerprint": "a1",
            "test_fingerprint": "b2",
        },
        "train": {"checkpoint": "run/best.pt", "best": {"epoch": 1, "value": 0.5, "metric": "accuracy"}},
        "register": {"version": "v0003"},
    }
    (tmp_path / "state.json").write_text(json.dumps(old))
    state = PipelineState.resume(tmp_path / "state.json", "old-run")
    assert state.run_id == "old-run" and state.registration is not None
    assert state.registration.version == "v0003" and state.train is not None
    assert state.train.best.metric is Metric.ACCURACY and state.evaluate is None  # resumes at evaluate
    (tmp_path / "bad.json").write_text('{"ingest": {"indexed": "many"}}')
    with pytest.raises(BinsightError, match="new --run-id"):
        PipelineState.resume(tmp_path / "bad.json", "bad")


def test_audit_csv_ranks_bins_and_reports(
    trained: dict[str, Path], tmp_path: Path, abid_bucket: dict
) -> None:
    images = sorted((trained["data"] / "images").glob("*.jpg"))[:6]
    folder = tmp_path / "bins"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    with open(folder / "bins.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "recorded_quantity"])
        writer.writerows([(image.name, 3) for image in images])
        writer.writerow(["missing.jpg", 2])
        writer.writerow([images[0].name, "two"])
        writer.writerow(["s3://aft-vbi-pds/bin-images/synth-000003.jpg", 1])
    out = tmp_path / "audit"
    code = main(
        [
            "audit",
            str(folder / "bins.csv"),
            "--model",
            str(trained["onnx_a"]),
            "--out",
            str(out),
            "--s3-endpoint-url",
            abid_bucket["endpoint"],
            "--s3-unsigned",
        ]
    )
    assert code == 0
    rows = read_csv(out / "audit.csv")
    assert len(rows) == 8
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))
    scored = [r for r in rows if r["verdict"] != "error"]
    wrong = [float(r["p_record_wrong"]) for r in scored]
    assert wrong == sorted(wrong, reverse=True)
    for row in scored:
        assert row["verdict"] in {"ok", "review", "mismatch"}
        # Bayes over the 10% of records assumed wrong: never more than if every other count the photo
        # might show pointed at this record, and lower the likelier the photo makes the record.
        p_recorded, wrong = float(row["p_recorded"]), float(row["p_record_wrong"])
        assert 0.0 <= wrong <= 0.1 * (1 - p_recorded) / (0.1 * (1 - p_recorded) + 0.9 * p_recorded) + 1e-6
    assert rows[-1]["verdict"] == "error" and "missing.jpg" in rows[-1]["image"]
    assert any(r["image"].startswith("s3://") for r in scored)
    summary = json.loads((out / "audit.json").read_text())
    assert len(summary["rejected_rows"]) == 1 and summary["bins"] == 8
    report = (out / "report.html").read_text()
    flagged = sum(r["verdict"] in {"review", "mismatch"} for r in rows)
    assert report.count("data:image/jpeg;base64,") == flagged

    budgeted = tmp_path / "budgeted"
    assert (
        main(
            [
                "audit",
                str(folder / "bins.csv"),
                "--model",
                str(trained["onnx_a"]),
                "--out",
                str(budgeted),
                "--s3-endpoint-url",
                abid_bucket["endpoint"],
                "--s3-unsigned",
                "--review-budget",
                "0.25",
            ]
        )
        == 0
    )
    ranked = read_csv(budgeted / "audit.csv")
    verdicts = [r["verdict"] for r in ranked]
    assert all(v in {"review", "mismatch"} for v in verdicts[:2])  # ceil(0.25 x 7 scored bins) = 2
    assert verdicts[2:7] == ["ok"] * 5 and verdicts[7] == "error"
    assert [r["image"] for r in ranked] == [r["image"] for r in rows]  # same ranking, fewer flags
    assert (
        main(["audit", str(folder / "bins.csv"), "--model", str(trained["onnx_a"]), "--review-budget", "0"])
        == 2
    )


def test_simulated_errors_and_catch_curve() -> None:
    truth = np.random.default_rng(0).integers(0, 6, 1000)
    recorded, is_error = simulate_errors(truth, 0.1, 6, seed=1)
    assert is_error.sum() == 100
    assert np.all(recorded[is_error] != truth[is_error]) and np.all(recorded[~is_error] == truth[~is_error])
    assert np.all((recorded >= 0) & (recorded < 6)) and np.all(np.abs(recorded - truth) <= 2)
    # A perfect scorer catches every error within a budget equal to the error rate; a constant one
    # is no better than chance.
    fraction, caught = catch_curve(is_error.astype(float), is_error)
    assert caught[99] == 1.0 and fraction[99] == pytest.approx(0.1)
    _, blind = catch_curve(np.zeros(1000), is_error)
    assert blind[199] == pytest.approx(is_error[:200].mean() * 200 / 100)


def test_audit_evaluation_writes_budgets_and_curve(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "audit",
            "--evaluate",
            "--model",
            str(trained["onnx_a"]),
            "--data",
            str(trained["data"]),
            "--split",
            "test",
            "--out",
            str(tmp_path),
            "--error-rate",
            "0.2",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "audit_evaluation.json").read_text())
    assert set(result["caught_at_budget"]) == {"5%", "10%", "20%"}
    caught = [result["caught_at_budget"][k]["errors_caught"] for k in ("5%", "10%", "20%")]
    assert caught == sorted(caught) and all(0 <= c <= 1 for c in caught)
    assert result["simulated_errors"] == round(0.2 * result["bins"])
    assert (tmp_path / "catch_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "re-check" in capsys.readouterr().out
    # The exported model carries a conformal calibration, so verdicts come with a known error rate.
    assert result["verdict_basis"].startswith("conformal")
    conformal = result["conformal"]
    assert set(conformal["false_alarm_rate_by_alpha"]) >= {"0.05", "0.1", "0.2"}
    assert (
        1 <= conformal["mean_set_size"] <= 6 and sum(conformal["set_size_counts"].values()) == result["bins"]
    )
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tune_with_two_parallel_workers_sharing_one_study(
    trained: dict[str, Path], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / "tune"
    # SQLite in the study folder (one machine), or a real PostgreSQL server (several machines).
    storage = (
        f"sqlite:///{out / 'study.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    )
    fixed = json.dumps(
        {"image_size": 32, "workers": 0, "max_train_batches": 2, "pretrained": False, "tensorboard": False}
    )
    command = [
        sys.executable,
        "-m",
        "binsight",
        "tune",
        "--data",
        str(trained["data"]),
        "--out",
        str(out),
        "--n-trials",
        "4",
        "--archs",
        "mobilenet_v3_small",
        "--batch-sizes",
        "8,16",
        "--epochs",
        "1:2",
        "--lr",
        "1e-4:1e-2",
        "--fixed",
        fixed,
        "--pruner",
        "median",
        *(["--storage", storage] if backend == "postgresql" else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", BINSIGHT_PROGRESS="0")
    out.mkdir()
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr.decode()[-3000:]
    study = optuna.load_study(study_name="binsight", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 4
    # Both workers ran trials of the one study (each trial records the process that ran it).
    assert len({t.user_attrs.get("worker") for t in study.trials}) == 2, [t.user_attrs for t in study.trials]
    rows = read_csv(out / "results.csv")
    assert len(rows) == len(study.trials) and {"number", "state", "value", "worker", "param_lr"} <= set(
        rows[0]
    )
    best = load_config(out / "best_config.json", {})
    assert best.arch == "mobilenet_v3_small" and best.image_size == 32 and best.lr == study.best_params["lr"]
    assert (out / "report.html").exists() and (out / "optimization_history.png").exists()


@needs_chromium
def test_web_pages_in_headless_chromium(trained: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo, other_photo = sorted((trained["data"] / "images").glob("*.jpg"))[:2]
    config = ServeConfig(
        model=trained["onnx_a"],
        capture_dir=tmp_path / "capture",
        capture_sample_rate=1.0,
        reload_interval_s=0,
    )
    # A capture record is a file on disk, and its model version comes from a model file: both are
    # rendered by /traffic, so a hostile one must show as text, not run.
    hostile = "<img src=x onerror=window.pwned=1>"
    (tmp_path / "capture").mkdir()
    (tmp_path / "capture" / "capture-20260101T000000-1-000000001.jsonl").write_text(
        json.dumps(
            {
                "time": "2026-01-01T00:00:00.000+00:00",
                "source": "body",
                "image_sha256": "0" * 64,
                "bytes": 1000,
                "width": 470,
                "height": 346,
                "count": 1,
                "confidence": 0.5,
                "model_version": hostile,
                "latency_ms": 1.0,
                "probabilities": [0.5, 0.5],
                "signals": {},
                "embedding": [],
                "expected_count": 2,
                "verdict": "<b>x</b>",
            }
        )
        + "\n"
    )
    with BackgroundServer(create_app(config), config) as server, sync_playwright() as playwright:
        expected = post_jpeg(f"{server.url}/v1/count?expected_count=2", photo.read_bytes()).json()[
            "predictions"
        ][0]
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            wait_in_page(page, "document.getElementById('model').textContent.includes('v-a')")
            page.fill("#expected", "2")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result:not([hidden])")
            assert page.text_content("#count") == str(expected["count"])
            assert page.text_content("#verdict") == expected["verdict"]
            assert page.locator("#bars .bar").count() == len(expected["probabilities"])
            page.set_input_files("#file", str(other_photo))  # a second upload for the traffic view
            wait_in_page(page, "document.getElementById('preview').src.startsWith('blob:')")

            page.goto(f"{server.url}/traffic")
            page.wait_for_selector("#total")
            deadline = time.monotonic() + 10
            while page.text_content("#total") != "4":  # the planted record, the API call, two uploads
                assert time.monotonic() < deadline, page.text_content("#summary")
                page.reload()
                page.wait_for_selector("#total")
            assert page.locator("#chart .col").count() >= 1
            assert page.locator("#recent tr").count() == 4
            assert page.locator("#recent img").count() == 0 and page.locator("#summary b").count() == 1
            assert page.evaluate("window.pwned") is None
            assert hostile in page.text_content("#recent")
            page.screenshot(path=str(tmp_path / "traffic.png"))
        finally:
            browser.close()


def test_audit_report_escapes_hostile_file_names(trained: dict[str, Path], tmp_path: Path) -> None:
    image = sorted((trained["data"] / "images").glob("*.jpg"))[0]
    hostile = "<svg onload=alert(document.domain)>.jpg"
    shutil.copy(image, tmp_path / hostile)
    (tmp_path / "bins.csv").write_text(f"image,recorded_quantity\n{hostile},3\n")
    out = tmp_path / "audit"
    args = ["audit", str(tmp_path / "bins.csv"), "--model", str(trained["onnx_a"]), "--out", str(out)]
    assert main([*args, "--review-budget", "1.0"]) == 0
    report = (out / "report.html").read_text()
    assert "&lt;svg onload=alert(document.domain)&gt;.jpg" in report
    assert "<svg" not in report


def test_audit_csv_from_excel_or_with_only_bad_rows(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = sorted((trained["data"] / "images").glob("*.jpg"))[0]
    shutil.copy(image, tmp_path / "bin.jpg")
    args = ["--model", str(trained["onnx_a"]), "--review-budget", "1.0"]

    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    excel.write_bytes("image,recorded_quantity\r\nbin.jpg,2\r\n".encode("utf-8-sig"))
    assert main(["audit", str(excel), "--out", str(tmp_path / "a"), *args]) == 0
    assert read_csv(tmp_path / "a" / "audit.csv")[0]["recorded_quantity"] == "2"

    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,recorded_quantity\nbin-é.jpg,2\n".encode("latin-1"))
    assert main(["audit", str(latin), "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "Traceback" not in err

    hopeless = tmp_path / "hopeless.csv"
    hopeless.write_text("image,recorded_quantity\nbin.jpg,two\nbin.jpg,²\n,3\n")
    assert main(["audit", str(hopeless), "--out", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert "none of the 3 rows" in err and "line 2" in err
    assert not (tmp_path / "c" / "audit.csv").exists()


def test_pipeline_resplit_keeps_the_datasets_own_fractions(tmp_path: Path) -> None:
    from binsight.data.index import build_index
    from binsight.data.split import SplitConfig, write_splits
    from binsight.pipeline.retrain import existing_split_config

    data = tmp_path / "data"
    generate_dataset(data, SynthConfig(n_images=60, image_size=64, seed=2, workers=1))
    build_index(data)
    assert existing_split_config(data, seed=5) == SplitConfig(seed=5)  # never split: the pipeline's seed
    chosen = SplitConfig(seed=3, val_fraction=0.25, test_fraction=0.3)
    first = write_splits(data, chosen)
    assert existing_split_config(data, seed=0) == chosen
    again = write_splits(data, existing_split_config(data, seed=0))
    assert again.splits["test"].fingerprint == first.splits["test"].fingerprint
