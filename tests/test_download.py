"""The download path against a real S3 protocol peer: a moto server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from binsight.cli import main
from binsight.data.download import DownloadConfig, download, read_file_list
from binsight.errors import BinsightError

from .conftest import unused_loopback_port


def _config(bucket: dict, out: Path, **kwargs) -> DownloadConfig:
    return DownloadConfig(out=out, endpoint_url=bucket["endpoint"], workers=4, retries=1, **kwargs)


def test_explicit_ids_reproduce_the_bucket_byte_for_byte(abid_bucket: dict, tmp_path: Path) -> None:
    ids = ["synth-000001", "synth-000010", "synth-000299"]
    report = download(_config(abid_bucket, tmp_path, ids=ids))
    assert (report.selected, report.downloaded, report.failed) == (3, 3, 0)
    source = abid_bucket["source"]
    for image_id in ids:
        for folder, ext in (("images", "jpg"), ("metadata", "json")):
            local = tmp_path / folder / f"{image_id}.{ext}"
            assert local.read_bytes() == (source / folder / f"{image_id}.{ext}").read_bytes()
    again = download(_config(abid_bucket, tmp_path, ids=ids))
    assert (again.downloaded, again.already_present) == (0, 3)


def test_per_class_selection_is_seeded_and_balanced(abid_bucket: dict, tmp_path: Path) -> None:
    report = download(_config(abid_bucket, tmp_path / "a", classes=(1, 3), per_class=4, seed=11))
    assert report.downloaded == 12 and report.failed == 0
    counts = Counter(
        json.loads(p.read_text())["EXPECTED_QUANTITY"] for p in (tmp_path / "a/metadata").glob("*.json")
    )
    assert counts == {1: 4, 2: 4, 3: 4}
    same = download(_config(abid_bucket, tmp_path / "b", classes=(1, 3), per_class=4, seed=11))
    other = download(_config(abid_bucket, tmp_path / "c", classes=(1, 3), per_class=4, seed=12))
    assert same.downloaded == other.downloaded == 12
    selection = (tmp_path / "a/selection.txt").read_text()
    assert (tmp_path / "b/selection.txt").read_text() == selection
    assert (tmp_path / "c/selection.txt").read_text() != selection


def test_class_range_with_limit_and_corrupt_objects_reported(abid_bucket: dict, tmp_path: Path) -> None:
    # Class 0 includes the truncated JPEG (9001); 9002 has broken JSON and fails the scan.
    report = download(_config(abid_bucket, tmp_path, classes=(0, 0)))
    problems = {p["id"]: p["problem"] for p in report.problems}
    assert problems["9001"].startswith("corrupt image")
    assert problems["9002"].startswith("bad metadata")
    assert report.failed == 1  # 9001; 9002 never got selected
    assert not (tmp_path / "images/9001.jpg").exists()
    assert not (tmp_path / "metadata/9001.json").exists()
    saved = json.loads((tmp_path / "download_report.json").read_text())
    assert saved["failed"] == 1 and saved["downloaded"] == report.downloaded > 0
    limited = download(_config(abid_bucket, tmp_path / "lim", classes=(1, 5), limit=7))
    assert limited.downloaded == 7


def test_file_list_in_the_student_subset_format(abid_bucket: dict, tmp_path: Path) -> None:
    listing = tmp_path / "file_list.json"
    listing.write_text(
        json.dumps(
            {
                "1": ["data/metadata/synth-000004.json"],
                "2": ["data/metadata/synth-000005.json", "metadata/9003.json"],
            }
        )
    )
    assert read_file_list(listing) == ["synth-000004", "synth-000005", "9003"]
    report = download(_config(abid_bucket, tmp_path / "out", file_list=listing))
    assert report.downloaded == 2
    assert next(p for p in report.problems if p["id"] == "9003")["problem"] == "not in bucket"


def test_bad_bucket_and_unreachable_endpoint_are_clear_errors(abid_bucket: dict, tmp_path: Path) -> None:
    with pytest.raises(BinsightError, match="does not exist"):
        download(DownloadConfig(out=tmp_path, endpoint_url=abid_bucket["endpoint"], bucket="nope"))
    closed_port = unused_loopback_port()
    with pytest.raises(BinsightError, match="cannot reach"):
        download(DownloadConfig(out=tmp_path, endpoint_url=f"http://127.0.0.1:{closed_port}", retries=0))


def test_cli_rejects_contradictory_selection(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["data", "download", str(tmp_path), "--per-class", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "per_class needs a class range" in err and "Traceback" not in err
    assert main(["data", "download", str(tmp_path), "--classes", "5-1"]) == 2


def test_killed_download_resumes_without_refetching(abid_bucket: dict, tmp_path: Path) -> None:
    out = tmp_path / "data"
    command = [
        sys.executable,
        "-m",
        "binsight",
        "data",
        "download",
        str(out),
        "--endpoint-url",
        abid_bucket["endpoint"],
        "--classes",
        "1-5",
        "--workers",
        "1",
    ]
    env = dict(os.environ, BINSIGHT_PROGRESS="0")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((out / "images").glob("*.jpg"))) < 15 and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("download finished before it could be interrupted")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    done_before = {p.name for p in (out / "images").glob("*.jpg")}
    assert 15 <= len(done_before) < 280
    # What a kill mid-write leaves behind: a half file under a temporary name, never the final one.
    (out / "images" / ".synth-000123.jpg.x.part").write_bytes(b"\xff\xd8 half")

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "download_report.json").read_text())
    # Each image finished before the kill is reused; a pair missing its metadata is completed.
    assert report["already_present"] >= len(done_before) - 1
    assert report["already_present"] + report["downloaded"] == report["selected"]
    assert report["failed"] == 0
    source = abid_bucket["source"]
    for image in (out / "images").glob("*.jpg"):
        assert image.read_bytes() == (source / "images" / image.name).read_bytes()
    assert len(list((out / "metadata").glob("*.json"))) == report["selected"]
