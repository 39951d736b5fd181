"""The endpoint's contract in OpenAPI terms: request bodies, predictions and errors.

The routes read their bodies themselves (an image body and a JSON body share one route, as in
SageMaker's contract), so FastAPI cannot infer these; they are described here from pydantic models and
checked against the running server by schemathesis in the tests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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
    count: int = Field(description="the most probable count")
    confidence: float = Field(description="its probability")
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


class Predictions(BaseModel):
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable cause, e.g. not_an_image, overloaded")
    message: str = Field(description="what went wrong and what to do")


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: _error("no model loaded yet, or over capacity (retry after the Retry-After seconds)"),
}

_PREDICTION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("the request is malformed: not an image, bad JSON, bad base64, bad S3 URI, ..."),
    403: _error("S3 denied access to the object"),
    404: _error("the S3 object does not exist"),
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
