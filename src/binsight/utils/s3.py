"""S3 addresses checked before any request, and the one way binsight builds an S3 client.

A URI is validated here, not by the endpoint: a malformed bucket name would otherwise surface as a
connection error (botocore turns it into a hostname), and a key with `.` or `..` segments may be
normalised by a proxy or an S3-compatible store into another object than the one named.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from binsight.errors import BinsightError

# AWS's rules for bucket names created since 2018: 3-63 characters, lower-case letters, digits, dots and
# hyphens, starting and ending with a letter or digit, no "..", and not shaped like an IP address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
MAX_KEY_BYTES = 1024
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


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
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no S3 key can hold it
        raise BadS3Uri("the S3 key is not valid Unicode text") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise BadS3Uri(f"the S3 key is over {MAX_KEY_BYTES} bytes")
    # C0/C1 controls (U+0085 included), format characters, and line/paragraph separators (U+2028/9):
    # each can split a log line or hide what an object is called.
    if any(unicodedata.category(char) in _UNSAFE_CATEGORIES for char in key):
        raise BadS3Uri("the S3 key contains control or invisible characters")
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


@dataclass(frozen=True)
class S3AllowList:
    """The bucket/prefixes a component may read on someone else's behalf. A prefix is a folder:
    `s3://b/photos` admits `s3://b/photos/x.jpg`, not `s3://b/photos-private/x.jpg`."""

    prefixes: tuple[S3Uri, ...]

    @classmethod
    def parse(cls, prefixes: list[str] | tuple[str, ...]) -> S3AllowList:
        folders = []
        for text in prefixes:
            location = parse_s3_uri(text, allow_prefix=True)
            key = location.key if not location.key or location.key.endswith("/") else location.key + "/"
            folders.append(S3Uri(location.bucket, key))
        return cls(tuple(folders))

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def allows(self, location: S3Uri) -> bool:
        return any(
            location.bucket == prefix.bucket and location.key.startswith(prefix.key)
            for prefix in self.prefixes
        )

    def __str__(self) -> str:
        return ", ".join(map(str, self.prefixes)) or "nothing"


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
