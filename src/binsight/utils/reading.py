"""Reading a photo named by an operator's manifest, audit run or queue: a local path or an S3 URI,
within the same byte limit as a request body, from regular files only."""

from __future__ import annotations

import os
import stat
from typing import Any

from binsight.utils.redact import redact

_clients: dict[tuple[str | None, bool], Any] = {}


def _client(endpoint_url: str | None, unsigned: bool) -> Any:
    """One S3 client per process and endpoint: clients are thread-safe and costly to build."""
    key = (endpoint_url, unsigned)
    if key not in _clients:
        from binsight.utils.s3 import s3_client

        # Timeouts bound each photo's wait: a silent endpoint costs a row, not the run.
        _clients[key] = s3_client(
            endpoint_url, unsigned=unsigned, max_pool_connections=32, timeout_s=30, max_attempts=3
        )
    return _clients[key]


# The server's defaults: a photo over these is refused in a batch run as it is by the server.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


def _read_local(path: str, max_bytes: int) -> bytes:
    """A regular file's bytes, at most `max_bytes`: a FIFO would block the run forever and a device
    (/dev/zero) would fill memory, so anything but a regular file is refused before it is opened."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise OSError(f"{path} is {info.st_size} bytes, over the limit of {max_bytes}")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise OSError(f"{path} is over the limit of {max_bytes} bytes")
    return data


def read_source(
    uri: str, endpoint_url: str | None, unsigned: bool, max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    if not uri.startswith("s3://"):
        return _read_local(uri, max_bytes)
    from botocore.exceptions import BotoCoreError, ClientError

    from binsight.utils.s3 import BadS3Uri, parse_s3_uri

    try:
        location = parse_s3_uri(uri)
    except BadS3Uri as exc:
        raise OSError(str(exc)) from None
    try:
        response = _client(endpoint_url, unsigned).get_object(Bucket=location.bucket, Key=location.key)
        declared = int(response.get("ContentLength", 0))
        if declared > max_bytes:
            response["Body"].close()
            raise OSError(f"{uri} is {declared} bytes, over the limit of {max_bytes}")
        return bytes(response["Body"].read(max_bytes + 1))[: max_bytes + 1]
    except (ClientError, BotoCoreError) as exc:
        raise OSError(f"cannot fetch {uri}: {redact(str(exc))}") from None
