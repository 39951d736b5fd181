"""A request's images: size limits checked from headers before decoding, decoding into model input
(through the monitoring signals' path, so the drift watch sees what the model sees), and S3 reads.
Failures are `RequestError`s carrying the HTTP status they should be answered with."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from binsight.imaging import ImageTooLargeError, open_image
from binsight.inference.runtime import LoadedModel
from binsight.monitoring.baseline import observe_photo
from binsight.utils.s3 import BadS3Uri, parse_s3_uri, s3_client

if TYPE_CHECKING:
    from binsight.serving.config import ServeConfig


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def overloaded() -> RequestError:
    return RequestError(503, "overloaded", "the server is at capacity; retry shortly", {"Retry-After": "1"})


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


class RequestInputs:
    """Reads and prepares the images of requests for one server process."""

    def __init__(self, config: ServeConfig, executor: Executor) -> None:
        self.config = config
        self.decoder = executor
        self._s3: Any = None

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
            observed = observe_photo(data, info.input_hw, info.mean, info.std, self.config.max_image_pixels)
        except (ImageTooLargeError, Image.DecompressionBombError) as exc:
            raise RequestError(413, "image_too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise RequestError(
                400, "not_an_image", "the body is not an image Pillow can read (JPEG, PNG, ...)"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(400, "corrupt_image", f"the image could not be decoded: {exc}") from None
        return Prepared(
            model,
            observed.pixels,
            observed.width,
            observed.height,
            hashlib.sha256(data).hexdigest(),
            len(data),
            observed.signals,
        )

    async def fetch_s3(self, uri: str) -> bytes:
        try:
            location = parse_s3_uri(uri)
        except BadS3Uri as exc:
            raise RequestError(400, "bad_s3_uri", exc.message) from None
        return await asyncio.get_running_loop().run_in_executor(
            self.decoder, self._get_s3_object, uri, location.bucket, location.key
        )

    def _get_s3_object(self, uri: str, bucket: str, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if self._s3 is None:
            self._s3 = s3_client(
                self.config.s3_endpoint_url,
                unsigned=self.config.s3_unsigned,
                timeout_s=self.config.s3_timeout_s,
                max_attempts=2,
            )
        try:
            response = self._s3.get_object(Bucket=bucket, Key=key)
            if response.get("ContentLength", 0) > self.config.max_body_bytes:
                raise RequestError(
                    413, "image_too_large", f"{uri} is over {self.config.max_body_bytes} bytes"
                )
            return bytes(response["Body"].read())
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "NoSuchBucket", "404"}:
                raise RequestError(404, "s3_not_found", f"{uri} does not exist") from None
            if code in {"AccessDenied", "403"}:
                raise RequestError(403, "s3_access_denied", f"access to {uri} was denied") from None
            raise RequestError(502, "s3_error", f"S3 answered {code or 'an error'} for {uri}") from None
        except NoCredentialsError:
            raise RequestError(
                502,
                "s3_no_credentials",
                f"the server has no AWS credentials to read {uri} (public buckets: serve with --s3-unsigned)",
            ) from None
        except BotoCoreError as exc:
            raise RequestError(502, "s3_unreachable", f"could not fetch {uri}: {exc}") from None
