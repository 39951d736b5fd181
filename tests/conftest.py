"""Shared fixtures: small synthetic datasets and a real S3 server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from binsight.data.synth import SynthConfig, generate_dataset

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
# `make test` runs two pytest-xdist workers: each worker's torch, and every process it starts, gets its
# share of the cores, since two workers with a full thread pool each would fight over the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# No test may reach AWS: fail fast on any credential or region lookup that would.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BUCKET = "aft-vbi-pds"
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic ABID-layout dataset (never modified by tests: copy it first)."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, SynthConfig(n_images=120, image_size=96, seed=7, workers=1))
    return root


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian chromium not installed"
)


def launch_chromium(playwright):  # type: ignore[no-untyped-def]
    """Debian's Chromium, headless, with no background traffic (the machine has no internet)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def wait_in_page(page, expression: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until `expression` is true in the page. Not `page.wait_for_function`: its polling compiles
    the predicate with eval inside the page, which binsight's Content-Security-Policy (no
    'unsafe-eval') refuses whenever the first check is false; `page.evaluate` goes through the
    DevTools protocol, which the page's CSP does not govern."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true in the page after {timeout_s:g} s: {expression}")
        time.sleep(0.05)


def unused_loopback_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_jpeg(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "image/jpeg"})


def s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version=UNSIGNED),
    )


def use_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed requests to moto: any key works, but boto3 must find one (and a region)."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


def make_public(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Like the real aft-vbi-pds: anyone may list the bucket and read its objects, with no credentials."""
    statements = [
        {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/*",
        },
        {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{bucket}",
        },
    ]
    client.put_bucket_policy(
        Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": statements})
    )


@pytest.fixture(scope="session")
def abid_bucket(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A bucket laid out like aft-vbi-pds: 300 good bins, one truncated JPEG, one broken JSON."""
    source = tmp_path_factory.mktemp("bucket-source")
    generate_dataset(source, SynthConfig(n_images=300, image_size=64, seed=3, workers=2))
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    make_public(client, BUCKET)
    for image in sorted((source / "images").glob("*.jpg")):
        client.put_object(Bucket=BUCKET, Key=f"bin-images/{image.name}", Body=image.read_bytes())
    for meta in sorted((source / "metadata").glob("*.json")):
        client.put_object(Bucket=BUCKET, Key=f"metadata/{meta.name}", Body=meta.read_bytes())
    good = (source / "images" / "synth-000000.jpg").read_bytes()
    client.put_object(Bucket=BUCKET, Key="bin-images/9001.jpg", Body=good[: len(good) // 2])
    client.put_object(
        Bucket=BUCKET,
        Key="metadata/9001.json",
        Body=b'{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 0, "image_fname": "9001.jpg"}',
    )
    client.put_object(Bucket=BUCKET, Key="bin-images/9002.jpg", Body=good)
    client.put_object(Bucket=BUCKET, Key="metadata/9002.json", Body=b'{"EXPECTED_QUANTITY": 2,')
    return {"endpoint": moto_endpoint, "source": source, "bucket": BUCKET}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small indexed dataset, two quickly trained models (different seeds) and their ONNX exports."""
    from binsight.data.index import build_index
    from binsight.data.split import SplitConfig, write_splits
    from binsight.export.onnx import ExportConfig, export
    from binsight.training.config import TrainConfig
    from binsight.training.engine import train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    generate_dataset(data, SynthConfig(n_images=160, image_size=64, seed=5, workers=2))
    build_index(data)
    write_splits(data, SplitConfig(val_fraction=0.2, test_fraction=0.2))
    paths: dict[str, Path] = {"data": data}
    for name, seed in (("a", 0), ("b", 1)):
        config = TrainConfig(
            data=data,
            out=root / f"run-{name}",
            arch="mobilenet_v3_small",
            pretrained=False,
            image_size=32,
            epochs=1,
            batch_size=16,
            workers=0,
            tensorboard=False,
            seed=seed,
            max_train_batches=3,
        )
        train(config)
        paths[f"checkpoint_{name}"] = root / f"run-{name}" / "best.pt"
        paths[f"onnx_{name}"] = root / f"model-{name}.onnx"
        export(
            ExportConfig(
                checkpoint=paths[f"checkpoint_{name}"], out=paths[f"onnx_{name}"], version=f"v-{name}"
            )
        )
    return paths


@dataclass(frozen=True)
class PostgresServer:
    port: int
    run: Callable[..., None]  # runs one of the server's binaries as the user that owns it
    bindir: Path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package; `.ci/run` installs it) started on 127.0.0.1 for this test
    session only, with its data in a temporary folder, stopped at the end."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not binaries:
        if os.environ.get("BINSIGHT_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (Debian: apt-get install postgresql)")
        pytest.skip("PostgreSQL not installed (Debian: apt-get install postgresql)")
    bindir = binaries[-1].parent
    root = Path(tempfile.mkdtemp(prefix="binsight-pg-"))
    # PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    port = unused_loopback_port()
    data = root / "data"

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        deadline = time.monotonic() + 30
        ready = [*as_user, str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        while subprocess.run(ready, capture_output=True).returncode:
            assert time.monotonic() < deadline, (root / "log").read_text()
            time.sleep(0.3)
        yield PostgresServer(port, run, bindir)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database of its own for each test on the session's server: tests share the server, never a
    study or a label store, whichever order (or pytest-xdist worker) they run in."""
    name = f"binsight_{uuid.uuid4().hex[:12]}"
    port = str(postgres_server.port)
    createdb = str(postgres_server.bindir / "createdb")
    postgres_server.run(createdb, "-h", "127.0.0.1", "-p", port, "-U", "postgres", name)
    # The URL exactly as the README writes it (SQLAlchemy maps postgresql:// to psycopg 3).
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"
