"""Batch prediction and audit over many photos: S3 prefixes and manifests on a real S3 server (moto),
Parquet shards, resumption after a crash, and the same run on a local Ray cluster."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from binsight.batch.run import read_results
from binsight.cli import main
from binsight.errors import BinsightError
from binsight.imaging import Preprocess
from binsight.inference.runtime import load_counter
from binsight.utils.io import read_csv
from tests.conftest import BUCKET, make_public, s3_client, unused_loopback_port

PHOTOS = "batch-photos"
SIZES = [(80, 48), (48, 96), (64, 64), (100, 30), (37, 53)]  # (width, height): mostly not square


@pytest.fixture(scope="module")
def photo_bucket(moto_endpoint: str, trained: dict[str, Path]) -> dict[str, object]:
    """23 photos of assorted shapes and one corrupt file, readable anonymously."""
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=PHOTOS)
    make_public(client, PHOTOS)
    sources = sorted((trained["data"] / "images").glob("*.jpg"))[:23]
    bodies: dict[str, bytes] = {}
    for index, source in enumerate(sources):
        buffer = io.BytesIO()
        Image.open(source).convert("RGB").resize(SIZES[index % len(SIZES)]).save(buffer, "JPEG", quality=90)
        bodies[f"s3://{PHOTOS}/site-7/photo-{index:03d}.jpg"] = buffer.getvalue()
    bodies[f"s3://{PHOTOS}/site-7/photo-999.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    for uri, body in bodies.items():
        client.put_object(Bucket=PHOTOS, Key=uri.split("/", 3)[3], Body=body)
    client.put_object(Bucket=PHOTOS, Key="site-7/notes.txt", Body=b"not a photo")
    return {"endpoint": moto_endpoint, "bodies": bodies, "prefix": f"s3://{PHOTOS}/site-7/"}


def _assert_same_results(got: pa.Table, expected: pa.Table) -> None:
    assert got.column_names == expected.column_names and got.num_rows == expected.num_rows
    for name in got.column_names:
        a, b = got.column(name).to_pylist(), expected.column(name).to_pylist()
        if name in {"probabilities", "confidence"}:  # NaN where unreadable, and engines may differ by ulps
            np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-5)
        else:
            assert a == b, name


def _predict(args: list[str]) -> int:
    return main(["predict", *args])


def test_predict_over_a_prefix_matches_the_server_path_and_resumes(
    photo_bucket: dict[str, object], trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--s3-endpoint-url", str(photo_bucket["endpoint"]), "--s3-unsigned"]
    args = [str(photo_bucket["prefix"]), "--model", str(trained["onnx_a"]), *common]
    assert _predict([*args, "--shard-size", "5", "--batch-size", "4"]) == 0
    shards = sorted((out / "shards").glob("part-*.parquet"))
    assert [p.name for p in shards] == [f"part-{i:06d}.parquet" for i in range(5)]
    table = read_results(out)
    bodies: dict[str, bytes] = photo_bucket["bodies"]  # type: ignore[assignment]
    assert table.column("image").to_pylist() == sorted(bodies)  # the .txt is not a photo
    assert table.column("row").to_pylist() == list(range(24))
    metadata = pq.read_schema(shards[0]).metadata
    assert metadata[b"binsight.model_version"] == b"v-a"

    # Every photo scored exactly as the server would score it (same decoding and normalisation).
    counter = load_counter(trained["onnx_a"])
    info = counter.info
    rows = table.to_pylist()
    for row in rows[:-1]:
        expected = counter.predict(Preprocess.from_card(info.card)(bodies[row["image"]])[None])[0]
        np.testing.assert_allclose(row["probabilities"], expected, atol=1e-5)
        assert row["predicted_count"] == info.classes[int(np.argmax(expected))] and row["problem"] == ""
    broken = rows[-1]
    assert broken["image"].endswith("photo-999.jpg") and broken["problem"].startswith("unreadable")
    assert broken["predicted_count"] == -1 and broken["confidence"] is None
    first = json.loads((out / "run.json").read_text())
    assert first["photos"] == 24 and first["unreadable"] == 1 and first["shards_resumed"] == 0

    # A crash lost shard 2: only it is redone; the others are not touched.
    (out / "shards" / "part-000002.parquet").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    assert _predict([*args, "--shard-size", "5", "--batch-size", "4"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["shards_resumed"], run["photos_scored"]) == (4, 5)
    assert {p.name: p.stat().st_mtime_ns for p in shards if p.name in before} == before
    _assert_same_results(read_results(out), table)

    # A shard damaged on disk (cut short) or edited (rows lost) is not trusted: readers name it, and
    # the same command scores those photos again.
    damaged, short = out / "shards" / "part-000003.parquet", out / "shards" / "part-000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:300])
    pq.write_table(pq.read_table(short).slice(0, 2), short)
    with pytest.raises(BinsightError, match=f"{damaged} is not a readable Parquet file"):
        read_results(out)
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    assert main(["recheck", "load", "--predictions", str(out), "--budget", "3", "--storage", storage]) == 2
    assert _predict([*args, "--shard-size", "5", "--batch-size", "4"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["shards_resumed"], run["photos_scored"]) == (3, 10)
    _assert_same_results(read_results(out), table)

    # Another model, or other shards, into the same folder would mix two runs: refused, unless asked.
    other = [str(photo_bucket["prefix"]), "--model", str(trained["onnx_b"]), *common, "--shard-size", "5"]
    assert _predict(other) == 2
    assert _predict([*args, "--shard-size", "7"]) == 2
    assert _predict([*other, "--restart"]) == 0
    assert (
        pq.read_schema(out / "shards" / "part-000000.parquet").metadata[b"binsight.model_version"] == b"v-b"
    )


def test_predict_from_a_local_manifest_and_clear_errors(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = sorted((trained["data"] / "images").glob("*.jpg"))[:6]
    listing = tmp_path / "photos.txt"
    listing.write_text("# tonight's bins\n" + "".join(f"{p}\n" for p in images))
    out = tmp_path / "out"
    assert _predict([str(listing), "--model", str(trained["onnx_a"]), "--out", str(out)]) == 0
    assert read_results(out).column("image").to_pylist() == [str(p) for p in images]

    # A plan this binsight cannot read (another version's, or edited by hand): refused, not overwritten.
    plan = json.loads((out / "plan.json").read_text())
    assert plan["photos"] == 6 and plan["scoring"]["judge"] is False
    (out / "plan.json").write_text(json.dumps({**plan, "scoring": "fp32"}))
    assert _predict([str(listing), "--model", str(trained["onnx_a"]), "--out", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert _predict([str(listing), "--model", str(trained["onnx_a"]), "--out", str(out), "--restart"]) == 0

    assert _predict([str(tmp_path / "nowhere"), "--model", str(trained["onnx_a"])]) == 2
    assert "neither a manifest" in capsys.readouterr().err
    assert _predict([str(listing)]) == 2
    assert "--model" in capsys.readouterr().err
    assert _predict([str(listing), "--model", str(trained["onnx_a"]), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_audit_of_an_abid_prefix_reads_each_record_from_its_metadata(
    abid_bucket: dict[str, object], trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    endpoint = str(abid_bucket["endpoint"])
    args = [f"s3://{BUCKET}/bin-images/", "--model", str(trained["onnx_a"]), "--out", str(out)]
    assert main(["audit", *args, "--s3-endpoint-url", endpoint, "--s3-unsigned", "--shard-size", "64"]) == 0
    rows = read_csv(out / "audit.csv")
    assert len(rows) == 302 and [int(r["rank"]) for r in rows] == list(range(1, 303))
    source: Path = abid_bucket["source"]  # type: ignore[assignment]
    for row in rows[:-2]:
        name = row["image"].rsplit("/", 1)[1].replace(".jpg", ".json")
        recorded = json.loads((source / "metadata" / name).read_text())["EXPECTED_QUANTITY"]
        assert int(row["recorded_quantity"]) == recorded
    # The truncated photo and the broken metadata document are errors, ranked last with their reason.
    errors = {r["image"].rsplit("/", 1)[1]: r["problem"] for r in rows[-2:]}
    assert set(errors) == {"9001.jpg", "9002.jpg"} and "bad metadata" in errors["9002.jpg"]
    summary = json.loads((out / "audit.json").read_text())
    assert summary["bins"] == 302 and summary["run"]["shards"] == 5
    assert summary["model_card"]["arch"] == "mobilenet_v3_small"  # which model judged, in the record


# A cluster on loopback for one test: no usage reports, and no token (a real cluster keeps Ray's
# default token authentication; its nodes and drivers share the token).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture()
def ray_cluster(tmp_path: Path) -> Iterator[str]:
    """A local Ray cluster of 2 CPUs that outlives the drivers the test kills, as a real one would."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI comes with binsight[ray]"
    port = unused_loopback_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, **RAY_ENV}
    start = [ray, "start", "--head", "--num-cpus=2", f"--port={port}", "--node-ip-address=127.0.0.1"]
    subprocess.run(
        [*start, "--include-dashboard=false", f"--temp-dir={temp}"],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_run_killed_midway_resumes_to_the_one_process_result(
    ray_cluster: str, abid_bucket: dict[str, object], trained: dict[str, Path], tmp_path: Path
) -> None:
    endpoint = str(abid_bucket["endpoint"])
    common = [
        f"s3://{BUCKET}/bin-images/",
        "--model",
        str(trained["onnx_a"]),
        "--s3-endpoint-url",
        endpoint,
        "--s3-unsigned",
        "--shard-size",
        "8",
        "--batch-size",
        "4",
    ]
    reference = tmp_path / "one-process"
    assert _predict([*common, "--out", str(reference)]) == 0

    out = tmp_path / "on-ray"
    command = [sys.executable, "-m", "binsight", "predict", *common, "--out", str(out), "--ray", ray_cluster]
    env = {**os.environ, **RAY_ENV, "BINSIGHT_PROGRESS": "0"}
    driver = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("part-*.parquet")) and driver.poll() is None:
        assert time.monotonic() < deadline, "no shard written within 2 minutes"
        time.sleep(0.02)
    if driver.poll() is not None:
        pytest.fail(f"the driver ended by itself ({driver.returncode}): {driver.stderr.read()[-3000:]!r}")  # type: ignore[union-attr]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's machine is gone
    driver.wait(timeout=30)
    survivors = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}
    assert 0 < len(survivors) < 38, f"the kill came too late to test resumption ({len(survivors)} shards)"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["shards_resumed"] == len(survivors) and run["executor"].startswith("ray")
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in survivors} == survivors
    _assert_same_results(read_results(out), read_results(reference))
