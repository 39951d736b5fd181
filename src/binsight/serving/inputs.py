"""A request's images: size limits checked from headers before decoding, decoding into model input
(through the monitoring signals' path, so the drift watch sees what the model sees), and S3 reads.
Failures are `RequestError`s carrying the HTTP status they should be answered with."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from binsight.imaging import ImageTooLargeError, Preprocess, UnsupportedImageError, open_image
from binsight.inference.runtime import LoadedModel
from binsight.monitoring.baseline import observe_photo
from binsight.utils.redact import redact
from binsight.utils.s3 import BadS3Uri, S3AllowList, S3Uri, parse_s3_uri, s3_client
from binsight.utils.text import whole_number

if TYPE_CHECKING:
    from starlette.requests import Request

    from binsight.serving.config import ServeConfig

log = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def overloaded() -> RequestError:
    return RequestError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})


async def read_body(request: Request, limit: int) -> bytes:
    declared = whole_number(request.headers.get("content-length"), max_digits=19)
    if declared is not None and declared > limit:
        raise RequestError(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints over 4,300 digits
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise RequestError(400, "bad_json", "the JSON body is nested too deeply") from None
    if not isinstance(document, dict):
        raise RequestError(400, "bad_json", "the JSON body must be an object")
    return document


@dataclass
class Prepared:
    model: LoadedModel
    pixels: np.ndarray
    width: int
    height: int
    digest: str
    size_bytes: int
    signals: dict[str, float]


def header_pixels(data: bytes) -> int:
    """Pixels the image header claims (0 if unreadable: decoding will say what is wrong)."""
    try:
        width, height = open_image(data).size
    except Exception:
        return 0
    return width * height


class ByteBudget:
    """Bytes of fetched S3 objects held by all requests of a process: an `s3_uri` request costs the
    server memory the client never sent, so it is admitted by bytes as a body is."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


class FetchLedger:
    """One request's fetched bytes: at most `per_request` in all (what a body may carry), returned to
    the process's budget when the request ends."""

    def __init__(self, budget: ByteBudget, per_request: int) -> None:
        self.budget, self.per_request, self.taken = budget, per_request, 0
        self._lock = threading.Lock()

    def take(self, size: int, uri: str) -> None:
        with self._lock:
            if self.taken + size > self.per_request:
                raise RequestError(
                    413,
                    "too_many_bytes",
                    f"the request's S3 objects hold over {self.per_request} bytes together (at {uri})",
                )
            if not self.budget.take(size):
                raise overloaded()
            self.taken += size

    def close(self) -> None:
        with self._lock:
            self.budget.give(self.taken)
            self.taken = 0


def _clean(message: str) -> str:
    """Pillow's messages name the in-memory file (`<_io.BytesIO object at 0x7f...>`): say "the image"."""
    return _OBJECT_REPR.sub("the image", message)[:300]


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class RequestInputs:
    """Reads and prepares the images of requests for one server process."""

    def __init__(self, config: ServeConfig, executor: Executor) -> None:
        self.config = config
        self.decoder = executor
        self.s3_allow = S3AllowList.parse(config.s3_allow)
        # S3 reads wait on the network: they get their own threads, so a slow or silent endpoint
        # cannot hold the decode threads that requests with image bodies need.
        self.fetcher = ThreadPoolExecutor(config.s3_fetch_threads, thread_name_prefix="s3-fetch")
        self.fetch_budget = ByteBudget(config.max_fetch_bytes)
        self._s3: Any = None
        self._s3_lock = threading.Lock()

    def ledger(self) -> FetchLedger:
        return FetchLedger(self.fetch_budget, self.config.max_body_bytes)

    def close(self) -> None:
        self.fetcher.shutdown(wait=False, cancel_futures=True)

    def check_request_pixels(self, images: list[bytes]) -> None:
        """Refuse a request whose images together would take too long to decode, before decoding any."""
        total = sum(header_pixels(data) for data in images)
        if total > self.config.max_request_pixels:
            raise RequestError(
                413,
                "too_many_pixels",
                f"the request's images hold {total:,} pixels together; the limit is "
                f"{self.config.max_request_pixels:,} per request (send fewer or smaller images)",
            )

    def prepare(self, data: bytes, model: LoadedModel) -> Prepared:
        if not data:
            raise RequestError(400, "empty_image", "the image is empty (0 bytes)")
        info = model.info
        try:
            observed = observe_photo(data, Preprocess.from_card(info.card), self.config.max_image_pixels)
        except (ImageTooLargeError, Image.DecompressionBombError) as exc:
            raise RequestError(413, "image_too_large", _clean(str(exc))) from None
        except (UnsupportedImageError, UnidentifiedImageError):
            raise RequestError(
                400, "not_an_image", "the body is not a JPEG, PNG or WebP image (checked by its first bytes)"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(
                400, "corrupt_image", f"the image could not be decoded: {_clean(str(exc))}"
            ) from None
        return Prepared(
            model,
            observed.pixels,
            observed.width,
            observed.height,
            hashlib.sha256(data).hexdigest(),
            len(data),
            observed.signals,
        )

    async def fetch_s3(self, uri: str, ledger: FetchLedger) -> bytes:
        """An allowed object's bytes. Nothing is asked of S3 for a URI outside the allow-list, and a
        missing object and a forbidden one get the same answer: a client learns nothing about objects
        it may not read."""
        try:
            location = parse_s3_uri(uri)
        except BadS3Uri as exc:
            raise RequestError(400, "bad_s3_uri", exc.message) from None
        if not self.s3_allow:
            raise RequestError(
                403,
                "s3_not_allowed",
                "this server does not fetch from S3; send the image itself, or ask the operator to allow "
                "a prefix (binsight serve --s3-allow s3://bucket/prefix/)",
            )
        if not self.s3_allow.allows(location):
            raise RequestError(
                403, "s3_not_allowed", "the URI is outside the S3 prefixes this server may read"
            )
        return await asyncio.get_running_loop().run_in_executor(
            self.fetcher, self._get_s3_object, str(location), location, ledger
        )

    def _client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = s3_client(
                    self.config.s3_endpoint_url,
                    unsigned=self.config.s3_unsigned,
                    timeout_s=self.config.s3_timeout_s,
                    max_attempts=2,
                    max_pool_connections=self.config.s3_fetch_threads,
                )
            return self._s3

    def _get_s3_object(self, uri: str, location: S3Uri, ledger: FetchLedger) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        unavailable = RequestError(
            404, "s3_unavailable", f"cannot read {uri}: it does not exist or this server may not read it"
        )
        try:
            response = self._client().get_object(Bucket=location.bucket, Key=location.key)
            limit = self.config.max_body_bytes
            declared = int(response.get("ContentLength", 0))
            if declared > limit:
                response["Body"].close()
                raise RequestError(413, "image_too_large", f"{uri} is over {limit} bytes")
            ledger.take(declared, uri)
            data = bytes(response["Body"].read(declared + 1))
            if len(data) != declared:  # a store that lies about the length gets no more than it said
                raise RequestError(502, "s3_error", f"S3 sent a different length than it declared for {uri}")
            return data
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404", "AccessDenied", "403", "AllAccessDisabled"}:
                raise unavailable from None
            log.warning("S3 error for %s: %s", uri, redact(str(exc)))
            raise RequestError(502, "s3_error", f"S3 answered {code or 'an error'} for {uri}") from None
        except NoCredentialsError:
            raise RequestError(
                502,
                "s3_no_credentials",
                f"the server has no AWS credentials to read {uri} (public buckets: serve with --s3-unsigned)",
            ) from None
        except BotoCoreError as exc:
            # The exception names the S3 endpoint, which is the operator's business, not the client's.
            log.warning("S3 unreachable for %s: %s", uri, redact(str(exc)))
            raise RequestError(502, "s3_unreachable", f"S3 could not be reached for {uri}") from None
