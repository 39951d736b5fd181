"""The endpoint's contract in OpenAPI terms: request bodies, predictions and errors.

The routes read their bodies themselves (an image body and a JSON body share one route, as in
SageMaker's contract), so FastAPI cannot infer these; they are described here from pydantic models and
checked against the running server by schemathesis in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from binsight.inference.engines import RuntimeChoice
from binsight.inference.runtime import ModelFacts
from binsight.inference.selfcheck import SelfCheck
from binsight.serving.sources import ReloadFailure

_EXPECTED = {
    "type": "integer",
    "minimum": 0,
    "maximum": 1_000_000,
    "description": "the recorded quantity, to get a verdict on it",
}
_ONE_IMAGE = {
    "anyOf": [
        {
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "byte", "description": "the photo, base64"},
                "expected_count": _EXPECTED,
            },
        },
        {
            "type": "object",
            "required": ["s3_uri"],
            "properties": {
                "s3_uri": {"type": "string", "pattern": "^s3://", "description": "s3://bucket/key"},
                "expected_count": _EXPECTED,
            },
        },
    ]
}
JSON_BODY = {
    "anyOf": [
        *_ONE_IMAGE["anyOf"],
        {
            "type": "object",
            "required": ["instances"],
            "properties": {
                "instances": {"type": "array", "minItems": 1, "items": _ONE_IMAGE},
                "expected_count": _EXPECTED,
            },
        },
    ]
}


class Prediction(BaseModel):
    count: int = Field(description="the most probable count (the answer that is most often exactly right)")
    confidence: float = Field(description="its probability")
    median_count: int = Field(
        description="the posterior median (the answer with the smallest absolute error)"
    )
    mean_count: float = Field(description="the posterior mean (the answer with the smallest squared error)")
    probabilities: dict[str, float] = Field(description="P(count) per class; the top class is 'that or more'")
    model_version: str
    latency_ms: float
    expected_count: int | None = None
    expected_within_range: bool | None = Field(
        None, description="false when expected_count is at or past the top class (then P(count >= top))"
    )
    agrees: bool | None = None
    p_expected: float | None = None
    verdict: str | None = Field(None, description="ok, review or mismatch")
    p_value: float | None = Field(
        None, description="conformal p-value of the record (calibrated models); mismatch when <= alpha"
    )
    p_record_wrong: float | None = Field(
        None,
        description="P(the record is wrong | photo, record), with 10% of records assumed wrong and a "
        "wrong record most often one or two off: the number `binsight audit` ranks bins by",
    )


class Predictions(BaseModel):
    predictions: list[Prediction]


class ModelDescription(ModelFacts):
    """`/v1/model`: the file being served, how it runs on this CPU, and how it judges records."""

    verdicts: str  # the basis of verdicts: conformal, or fixed thresholds
    max_batch_size: int
    runtime: RuntimeChoice
    self_check: SelfCheck | None
    last_reload_failure: ReloadFailure | None


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable cause, e.g. not_an_image, overloaded")
    message: str = Field(description="what went wrong and what to do")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_json(code: str, message: str) -> bytes:
    """Every error the server answers, from the router, the middleware or the raw socket, has this body."""
    return ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump_json().encode()


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: _error("no model loaded yet, or over capacity (retry after the Retry-After seconds)"),
}

_PREDICTION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("the request is malformed: not an image, bad JSON, bad base64, bad S3 URI, ..."),
    403: _error("the s3_uri is outside the prefixes this server may read (or S3 inputs are off)"),
    404: _error("the S3 object does not exist, or this server may not read it"),
    413: _error("body, image, pixel count or number of images over the limit"),
    415: _error("unsupported content type"),
    500: _error("a defect in the server (logged)"),
    502: _error("S3 could not be reached or answered an error"),
    503: _error("over capacity: retry after the Retry-After seconds"),
    504: _error("the request did not finish before the server's deadline"),
}


def invocation_body() -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "image/jpeg": binary,
                "image/png": binary,
                "application/x-image": binary,
                "application/json": {"schema": JSON_BODY},
            },
        },
        "parameters": [
            {
                "name": "expected_count",
                "in": "query",
                "required": False,
                "description": "the recorded quantity (image bodies; JSON bodies carry it inside)",
                "schema": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            }
        ],
    }


def invocation_responses(many_or_one: bool) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any]
    if many_or_one:
        ok = {
            "description": "one prediction, or {predictions: [...]} when the request had instances",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/Prediction"},
                            {"$ref": "#/components/schemas/Predictions"},
                        ]
                    }
                }
            },
        }
    else:
        ok = {"model": Predictions, "description": "the predictions, in request order"}
    return {200: ok, **_PREDICTION_ERRORS}


def declare_security(app: Any, auth_required: bool, scope_of: Callable[[str], object | None]) -> None:
    """The bearer scheme in the OpenAPI document, and on each route that needs a token, with its scope
    (`scope_of(path)`, None for public routes; OpenAPI lists scopes only for OAuth, so the scope goes in
    the description)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return dict(app.openapi_schema)
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        if auth_required:
            components = document.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "a token from the server's tokens file (binsight token new)",
            }
            for path, operations in document.get("paths", {}).items():
                scope = scope_of(path)
                if scope is None:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation["description"] = (
                        operation.get("description", "") + f" Needs a token with the `{scope}` scope."
                    ).strip()
                    operation.setdefault("responses", {})["401"] = {
                        "description": "no token, or not a valid one",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                        },
                    }
                    operation["responses"]["403"] = {
                        "description": "the token lacks the scope, or S3 access outside the allow-list",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                        },
                    }
        app.openapi_schema = document
        return document

    app.openapi = schema
