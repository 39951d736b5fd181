"""Data-stage throughput: synthetic generation and S3 download, each against an in-run baseline.

- synth: all cores (default workers) vs one process, writing the same 224 px images to disk.
- download: 16 parallel connections vs 1, from a moto S3 server (its own process) on 127.0.0.1 holding
  an ABID-shaped bucket. A local server has no network latency, so parallelism gains far less here than
  against real S3, where each request waits tens of milliseconds.

Run: .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from binsight.data.download import DownloadConfig, download
from binsight.data.synth import SynthConfig, generate_dataset

os.environ.setdefault("BINSIGHT_PROGRESS", "0")
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def timed_synth(root: Path, n: int, workers: int) -> float:
    started = time.perf_counter()
    generate_dataset(root, SynthConfig(n_images=n, image_size=224, workers=workers, seed=1))
    return n / (time.perf_counter() - started)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        n = 1000
        one = timed_synth(tmp_path / "synth1", n, workers=1)
        many = timed_synth(tmp_path / "synthN", n, workers=os.cpu_count() or 1)
        print(
            f"synth 224px: {many:.0f} images/s with {os.cpu_count()} processes, "
            f"{one:.0f} images/s with 1 (ratio {many / one:.2f}x); target >= 200 images/s"
        )

        # The S3 server runs in its own process, so that it does not share the client's GIL.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=Config(signature_version=UNSIGNED),
        )
        client.create_bucket(Bucket="aft-vbi-pds")
        client.put_bucket_policy(
            Bucket="aft-vbi-pds",
            Policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": "*",
                            "Action": ["s3:GetObject", "s3:ListBucket"],
                            "Resource": ["arn:aws:s3:::aft-vbi-pds", "arn:aws:s3:::aft-vbi-pds/*"],
                        }
                    ],
                }
            ),
        )
        source = tmp_path / "synthN"
        for image in (source / "images").glob("*.jpg"):
            client.put_object(Bucket="aft-vbi-pds", Key=f"bin-images/{image.name}", Body=image.read_bytes())
        for meta in (source / "metadata").glob("*.json"):
            client.put_object(Bucket="aft-vbi-pds", Key=f"metadata/{meta.name}", Body=meta.read_bytes())

        rates = {}
        for workers in (1, 16):
            report = download(
                DownloadConfig(
                    out=tmp_path / f"dl{workers}", endpoint_url=endpoint, workers=workers, limit=600
                )
            )
            assert report.downloaded == 600, report
            rates[workers] = report.images_per_second or 0.0
        server.terminate()
        server.wait(timeout=10)
        print(
            f"download from moto on 127.0.0.1: {rates[16]:.0f} images/s with 16 connections, "
            f"{rates[1]:.0f} with 1 (ratio {rates[16] / rates[1]:.2f}x)"
        )


if __name__ == "__main__":
    main()
