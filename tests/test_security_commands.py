"""The commands as an attacker (or an unlucky operator) meets them: secrets in URLs, changed or hostile
batch inputs, the registry's cache, names and concurrent writers, and odd capture lines. Each test runs
the real command or the real library call against real files, a real S3 server (moto) or PostgreSQL."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from binsight.cli import main
from binsight.errors import BinsightError
from binsight.registry import Registry
from binsight.serving.app import create_app
from binsight.serving.config import ServeConfig
from binsight.utils.io import read_csv
from binsight.utils.redact import redact
from tests.background import BackgroundServer

from .conftest import make_public, post_jpeg, s3_client, unused_loopback_port, use_test_credentials

PASSWORD = "Hunter2-s3cr3t-PW"


def photos(trained: dict[str, Path], n: int) -> list[Path]:
    return sorted((trained["data"] / "images").glob("*.jpg"))[:n]


def everything_written(folder: Path) -> str:
    text = []
    for path in folder.rglob("*"):
        if path.is_file():
            text.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(text)


def test_redact_hides_passwords_in_urls_and_keywords() -> None:
    assert redact("postgresql+psycopg2://user:pa:ss@db:5432/x") == "postgresql+psycopg2://user:***@db:5432/x"
    assert redact("connect host=db password=abc user=x") == "connect host=db password=*** user=x"
    assert redact("http://minio:k3y@10.0.0.1:9000/b") == "http://minio:***@10.0.0.1:9000/b"
    assert redact("s3://bucket/key and sqlite:///tmp/x.db") == "s3://bucket/key and sqlite:///tmp/x.db"


def test_no_command_prints_or_writes_a_password(
    trained: dict[str, Path], tmp_path: Path, postgres_url: str
) -> None:
    """tune against PostgreSQL with a password in the URL (trust auth ignores it), the same with an
    unreachable database, serve and predict with an S3 endpoint that carries credentials: every byte
    they print or write is searched for the password."""
    secret_url = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@")
    dead_port = unused_loopback_port()
    fixed = json.dumps({"image_size": 32, "workers": 0, "max_train_batches": 1, "pretrained": False})
    base = [sys.executable, "-m", "binsight"]
    tune = [
        *base,
        "tune",
        "--data",
        str(trained["data"]),
        "--n-trials",
        "1",
        "--archs",
        "mobilenet_v3_small",
        "--batch-sizes",
        "8",
        "--epochs",
        "1:1",
        "--fixed",
        fixed,
    ]
    endpoint = f"http://minio:{PASSWORD}@127.0.0.1:{dead_port}"
    runs = {
        "tune": [*tune, "--out", str(tmp_path / "tune"), "--storage", secret_url],
        "tune-unreachable": [
            *tune,
            "--out",
            str(tmp_path / "tune-down"),
            "--storage",
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:{dead_port}/binsight",
        ],
        "predict": [
            *base,
            "predict",
            "s3://bins/photos/",
            "--model",
            str(trained["onnx_a"]),
            "--out",
            str(tmp_path / "predict"),
            "--s3-endpoint-url",
            endpoint,
            "--s3-unsigned",
        ],
    }
    env = dict(os.environ, BINSIGHT_PROGRESS="0", OMP_NUM_THREADS="1")
    # Side by side: each waits on its own database or endpoint, and none reads what another writes.
    started = {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, command in runs.items()
    }
    outputs = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=300)
            outputs[name] = (process.returncode, stdout + stderr)
    finally:
        for process in started.values():
            process.kill()  # only the ones a timeout left running: the others have exited
    assert outputs["tune"][0] == 0, outputs["tune"][1][-2000:]
    assert outputs["tune-unreachable"][0] == 2 and "postgres:***@" in outputs["tune-unreachable"][1]
    assert outputs["predict"][0] == 2  # the endpoint is down: a clear error, not a traceback
    assert "Traceback" not in outputs["predict"][1]
    summary = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert summary["storage"] == secret_url.replace(PASSWORD, "***")

    # The server: its S3 endpoint holds the password; a fetch fails against the dead endpoint and is
    # logged; the config it reports and every response must not carry it.
    config = ServeConfig(
        model=trained["onnx_a"],
        reload_interval_s=0,
        backend="onnxruntime",
        s3_endpoint_url=endpoint,
        s3_unsigned=True,
        s3_timeout_s=1,
        s3_allow=["s3://bins/"],
    )
    assert PASSWORD not in config.model_dump_json()
    with BackgroundServer(create_app(config), config) as s:
        answer = httpx.post(f"{s.url}/invocations", json={"s3_uri": "s3://bins/a.jpg"}, timeout=60)
        served = answer.text + httpx.get(f"{s.url}/v1/model").text + httpx.get(f"{s.url}/metrics").text
    assert answer.status_code == 502
    for name, (_, printed) in outputs.items():
        assert PASSWORD not in printed, name
    assert PASSWORD not in served
    assert PASSWORD not in everything_written(tmp_path)


@pytest.fixture()
def manifest_run(trained: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    rows = [{"image": str(p), "recorded_quantity": "2"} for p in photos(trained, 6)]
    manifest = tmp_path / "night.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "recorded_quantity"])
        writer.writeheader()
        writer.writerows(rows)
    return {"manifest": manifest, "out": tmp_path / "audit", "model": trained["onnx_a"]}


def audit(run: dict[str, Path], *extra: str) -> int:
    return main(
        ["audit", str(run["manifest"]), "--model", str(run["model"]), "--out", str(run["out"]), *extra]
    )


def test_a_changed_manifest_is_refused_not_silently_resumed(
    manifest_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit(manifest_run) == 0
    text = manifest_run["manifest"].read_text().replace(",2\n", ",3\n", 1)
    manifest_run["manifest"].write_text(text)
    assert audit(manifest_run) == 2
    assert "changed since the run" in capsys.readouterr().err
    with manifest_run["manifest"].open("a") as handle:
        handle.write(f"{manifest_run['manifest'].parent}/extra.jpg,1\n")
    assert audit(manifest_run) == 2
    assert audit(manifest_run, "--restart") == 0
    rows = read_csv(manifest_run["out"] / "audit.csv")
    assert len(rows) == 7 and any(r["recorded_quantity"] == "3" for r in rows)


def test_a_changed_folder_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photos(trained, 4):
        (folder / path.name).write_bytes(path.read_bytes())
    command = ["predict", str(folder), "--model", str(trained["onnx_a"]), "--out", str(tmp_path / "out")]
    assert main(command) == 0
    (folder / "late-arrival.jpg").write_bytes(photos(trained, 5)[-1].read_bytes())
    assert main(command) == 2
    assert main([*command, "--restart"]) == 0


def test_hostile_manifest_cells_reach_no_spreadsheet_or_terminal(
    manifest_run: dict[str, Path], tmp_path: Path
) -> None:
    hostile = {
        '=HYPERLINK("http://evil.example","x")': "=HYPERLINK(",
        "+cmd|' /C calc'!A0": "+cmd",
        "@SUM(1+1)": "@SUM",
        "-2+3": "-2+3",
        "bell\x07and\x1b[31mred": "bell",
    }
    with manifest_run["manifest"].open("a") as handle:
        writer = csv.writer(handle)
        for name in hostile:
            writer.writerow([str(tmp_path / name.replace("/", "_")), "1"])
    assert audit(manifest_run) == 0
    text = (manifest_run["out"] / "audit.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    for row in rows:
        for column in ("image", "problem"):
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), row[column]
    assert "\x1b" not in text and "\x07" not in text
    report = (manifest_run["out"] / "report.html").read_text()
    assert "\x1b" not in report and "\x07" not in report


def test_duplicate_rows_are_scored_once_and_reported(manifest_run: dict[str, Path]) -> None:
    first = manifest_run["manifest"].read_text().splitlines()[1]
    with manifest_run["manifest"].open("a") as handle:
        handle.write(first + "\n")
    assert audit(manifest_run) == 0
    assert len(read_csv(manifest_run["out"] / "audit.csv")) == 6
    summary = json.loads((manifest_run["out"] / "audit.json").read_text())
    assert [r["problem"] for r in summary["rejected_rows"]] == ["duplicate of line 2"]


def test_batch_refuses_fifos_devices_bombs_and_oversized_files(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    import io

    from PIL import Image

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    bomb = tmp_path / "bomb.png"
    buffer = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(buffer, "PNG")  # 169 MP in a few hundred kB
    bomb.write_bytes(buffer.getvalue())
    big = tmp_path / "big.jpg"
    big.write_bytes(photos(trained, 1)[0].read_bytes() + b"\0" * 3_000_000)
    good = photos(trained, 1)[0]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, [good, fifo, "/dev/zero", bomb, big])) + "\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "binsight",
            "predict",
            str(listing),
            "--model",
            str(trained["onnx_a"]),
            "--out",
            str(out),
            "--max-image-bytes",
            "2000000",
        ],
        capture_output=True,
        text=True,
        timeout=120,  # a FIFO row used to hang the run forever
        env=dict(os.environ, BINSIGHT_PROGRESS="0"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from binsight.batch.run import read_results

    problems = dict(
        zip(
            read_results(out).column("image").to_pylist(),
            read_results(out).column("problem").to_pylist(),
            strict=True,
        )
    )
    assert problems[str(good)] == ""
    assert "not a regular file" in problems[str(fifo)] and "not a regular file" in problems["/dev/zero"]
    assert "over the limit" in problems[str(bomb)] and "over the limit" in problems[str(big)]


def test_a_remote_manifest_reads_only_its_own_prefix(
    trained: dict[str, Path], moto_endpoint: str, tmp_path: Path
) -> None:
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="nightly")
    make_public(client, "nightly")
    body = photos(trained, 1)[0].read_bytes()
    client.put_object(Bucket="nightly", Key="site-3/a.jpg", Body=body)
    client.put_object(Bucket="nightly", Key="other/b.jpg", Body=body)
    local = tmp_path / "secret.jpg"
    local.write_bytes(body)
    lines = [
        "a.jpg",
        "s3://nightly/site-3/a.jpg",
        "s3://nightly/other/b.jpg",
        str(local),
        "/proc/self/environ",
        "../other/b.jpg",
    ]
    client.put_object(Bucket="nightly", Key="site-3/list.txt", Body="\n".join(lines).encode())
    out = tmp_path / "out"
    command = [
        "predict",
        "s3://nightly/site-3/list.txt",
        "--model",
        str(trained["onnx_a"]),
        "--out",
        str(out),
        "--s3-endpoint-url",
        moto_endpoint,
        "--s3-unsigned",
    ]
    assert main(command) == 0
    from binsight.batch.run import read_results

    scored = sorted(read_results(out).column("image").to_pylist())
    assert scored == ["s3://nightly/site-3/a.jpg"]
    rejected = json.loads((out / "run.json").read_text())["rejected_rows"]
    assert {r["image"] for r in rejected} >= {str(local), "/proc/self/environ", "s3://nightly/other/b.jpg"}
    assert (
        main([*command, "--restart", "--allow-root", str(tmp_path), "--allow-root", "s3://nightly/other/"])
        == 0
    )
    # a.jpg once, b.jpg once (allowed now), the local photo; never /proc, and `../` still stays home.
    assert sorted(read_results(out).column("image").to_pylist()) == sorted(
        ["s3://nightly/site-3/a.jpg", "s3://nightly/other/b.jpg", str(local)]
    )


def test_stale_partial_shards_are_removed(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    stale = out / "shards" / ".part-000000.parquet.123.part"
    stale.write_bytes(b"half a shard")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, photos(trained, 3))))
    assert main(["predict", str(listing), "--model", str(trained["onnx_a"]), "--out", str(out)]) == 0
    assert not stale.exists()


def test_two_registries_never_share_a_cached_model(trained: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name, model in (("one", "a"), ("two", "b")):
        registry = Registry(tmp_path / name)
        registry.register(trained[f"checkpoint_{model}"], trained[f"onnx_{model}"], {}, {})
        registry.set_alias("production", "v0001")
    jpeg = photos(trained, 1)[0].read_bytes()
    answers = {}
    for name in ("one", "two"):
        config = ServeConfig(registry=str(tmp_path / name), registry_cache=cache, reload_interval_s=0)
        with BackgroundServer(create_app(config), config) as s:
            answers[name] = post_jpeg(f"{s.url}/invocations", jpeg).json()["probabilities"]
    expected = {}
    for name, model in (("one", "a"), ("two", "b")):
        from binsight.inference.runtime import load_counter

        path = Registry(tmp_path / name).fetch_verified("v0001", "model.onnx", tmp_path / "check")
        assert path.read_bytes() == trained[f"onnx_{model}"].read_bytes()
        expected[name] = load_counter(path, backend="auto").info.version
    assert answers["one"] != answers["two"]
    assert stat.S_IMODE((cache).stat().st_mode) == 0o700 or all(
        stat.S_IMODE(p.stat().st_mode) == 0o700 for p in cache.iterdir()
    )


def test_a_planted_cache_file_is_never_served(trained: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.register(trained["checkpoint_a"], trained["onnx_a"], {}, {})
    cache = tmp_path / "cache"
    real = registry.fetch_verified("v0001", "model.onnx", cache)
    real.write_bytes(trained["onnx_b"].read_bytes())  # another local user's model, under the right name
    again = registry.fetch_verified("v0001", "model.onnx", cache)
    assert again.read_bytes() == trained["onnx_a"].read_bytes()
    # The registry's own copy changed after registration: refused, not served.
    (tmp_path / "registry/versions/v0001/model.onnx").write_bytes(trained["onnx_b"].read_bytes())
    again.unlink()
    with pytest.raises(BinsightError, match=r"not the .* its meta\.json records"):
        registry.fetch_verified("v0001", "model.onnx", cache)


def test_a_failed_registration_does_not_break_the_listing(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.register(trained["checkpoint_a"], trained["onnx_a"], {"accuracy": 0.5}, {})
    (tmp_path / "registry/versions/v0002").mkdir()  # killed half way: artifacts, no meta.json
    (tmp_path / "registry/versions/v0002/model.pt").write_bytes(b"partial")
    assert main(["models", "list", "--registry", str(tmp_path / "registry")]) == 0
    listing = capsys.readouterr().out
    assert "v0001" in listing and "incomplete" in listing and "v0002" in listing
    with pytest.raises(BinsightError, match=r"lacks binsight metadata|not a loadable"):
        bogus = tmp_path / "bogus.onnx"
        bogus.write_bytes(b"junk")
        registry.register(trained["checkpoint_a"], bogus, {}, {})
    assert registry.versions() == ["v0001"]  # nothing was uploaded for the refused file
    assert registry.register(trained["checkpoint_b"], trained["onnx_b"], {}, {}) == "v0003"


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_concurrent_promotes_lose_no_history(
    trained: dict[str, Path], tmp_path: Path, moto_endpoint: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "s3":
        use_test_credentials(monkeypatch)
        s3_client(moto_endpoint).create_bucket(Bucket="race-models")
        url, endpoint = "s3://race-models/reg", moto_endpoint
    else:
        url, endpoint = str(tmp_path / "registry"), None
    registry = Registry(url, endpoint)
    versions = [registry.register(trained["checkpoint_a"], trained["onnx_a"], {}, {}) for _ in range(8)]
    start = threading.Barrier(len(versions))

    def promote(version: str) -> None:
        mine = Registry(url, endpoint)
        start.wait()
        mine.set_alias("production", version, "race")

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = registry.alias("production")
    assert record is not None
    assert sorted([*record.history, record.version]) == sorted(versions)  # every move is in the history


def test_names_are_never_paths(trained: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.register(trained["checkpoint_a"], trained["onnx_a"], {}, {})
    registry.set_alias("production", "v0001")
    outside = tmp_path / "y.json"
    for command in (
        ["models", "promote", "../versions/v0001/meta", "--registry", str(tmp_path / "registry")],
        ["models", "rollback", "--alias", "../../y", "--registry", str(tmp_path / "registry")],
        ["models", "show", "../../x", "--registry", str(tmp_path / "registry")],
        [
            "pipeline",
            "--data",
            str(trained["data"]),
            "--registry",
            str(tmp_path / "r"),
            "--run-id",
            "../../x",
        ],
    ):
        assert main(command) == 2, command
    assert not outside.exists() and not (tmp_path.parent / "x").exists()
    with pytest.raises(BinsightError):
        registry.fetch("../v0001", "model.onnx", tmp_path / "m.onnx")


def _capture_line(**fields: object) -> str:
    record = {
        "time": "2026-11-29T10:00:00",
        "count": 1,
        "confidence": 0.5,
        "model_version": "v-a",
        "signals": {
            k: 1.0
            for k in ("width", "height", "kilobytes", "brightness", "contrast", "sharpness", "jpeg_quality")
        },
        "embedding": [0.0] * 16,
    }
    record.update(fields)
    return json.dumps(record)


def test_monitor_survives_odd_capture_lines_and_exits_with_a_code_cron_can_read(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "capture"
    capture.mkdir()
    odd = [
        _capture_line(signals=[]),
        '{"count": 1e999, "confidence": 0.5, "signals": {}}',
        "[" * 100_000 + "]" * 100_000,
        _capture_line(embedding=[0.1] * 7),  # another model's embedding
        _capture_line(model_version="v-zzz"),  # after a hot reload to another model
        _capture_line(count=True),
        "not json at all",
    ]
    (capture / "capture-20261129T100000-1-000000001.jsonl").write_text("\n".join(odd) + "\n")
    command = ["monitor", str(capture), "--model", str(trained["onnx_a"]), "--out", str(tmp_path / "m")]
    assert main([*command, "--fail-on-drift"]) == 4  # nothing usable: cannot judge, not "no drift"
    printed = capsys.readouterr().out
    assert "other model version" in printed and "incomplete or invalid record" in printed
    assert main(command) == 0
