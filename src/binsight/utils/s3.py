"""S3 addresses checked before any request, and the one way binsight builds an S3 client.

A URI is validated here, not by the endpoint: a malformed bucket name would otherwise surface as a
connection error (botocore turns it into a hostname), and a key with `.` or `..` segments may be
normalised by a proxy or an S3-compatible store into another object than the one named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from binsight.errors import BinsightError

# AWS's rules for bucket names created since 2018: 3-63 characters, lower-case letters, digits, dots and
# hyphens, starting and ending with a letter or digit, no "..", and not shaped like an IP address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
MAX_KEY_BYTES = 1024


class BadS3Uri(BinsightError):
    pass


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def check_bucket(bucket: str) -> None:
    if not _BUCKET.match(bucket) or ".." in bucket or _IP.match(bucket):
        raise BadS3Uri(
            f"{bucket!r} is not a valid S3 bucket name",
            hint="bucket names are 3-63 lower-case letters, digits, dots or hyphens",
        )


def check_key(key: str, *, allow_prefix: bool = False) -> None:
    if not key and not allow_prefix:
        raise BadS3Uri("the S3 URI names no object", hint="use s3://bucket/key")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise BadS3Uri(f"the S3 key is over {MAX_KEY_BYTES} bytes")
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise BadS3Uri("the S3 key contains control characters")
    if any(part in {".", ".."} for part in key.split("/")):
        raise BadS3Uri(f"the S3 key {key!r} has '.' or '..' segments", hint="name the object directly")


def parse_s3_uri(uri: str, *, allow_prefix: bool = False) -> S3Uri:
    """`s3://bucket/key`, validated; with `allow_prefix`, `s3://bucket` and `s3://bucket/prefix/` too."""
    if not uri.startswith("s3://"):
        raise BadS3Uri(f"{uri[:200]!r} is not an s3:// URI", hint="use s3://bucket/key")
    bucket, _, key = uri[5:].partition("/")
    check_bucket(bucket)
    if not allow_prefix and (not key or key.endswith("/")):
        raise BadS3Uri(f"{uri[:200]!r} names a folder, not an object", hint="use s3://bucket/key")
    check_key(key, allow_prefix=allow_prefix)
    return S3Uri(bucket, key)


def s3_client(
    endpoint_url: str | None = None,
    *,
    unsigned: bool = False,
    timeout_s: float | None = None,
    max_attempts: int | None = None,
    max_pool_connections: int | None = None,
    read_timeout_s: float | None = None,
    region: str | None = None,
) -> Any:
    """A boto3 S3 client from its own session (sessions are not thread-safe; clients are)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    options: dict[str, Any] = {}
    if unsigned:
        options["signature_version"] = UNSIGNED
    if timeout_s is not None:
        options.update(connect_timeout=timeout_s, read_timeout=timeout_s)
    if read_timeout_s is not None:
        options["read_timeout"] = read_timeout_s
    if max_attempts is not None:
        options["retries"] = {"max_attempts": max_attempts, "mode": "standard"}
    if max_pool_connections is not None:
        options["max_pool_connections"] = max_pool_connections
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options)
    )
