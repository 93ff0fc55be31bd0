"""The HTTP API's shapes: the request body (read here, checked by the runtime's request contract),
the responses and the OpenAI-style errors.

Every limit of a generation request is `ilf_deploy.runtime.request.RequestContract`'s, which
`generate` and the Triton model use too; the request's JSON Schema in the OpenAPI document is the
contract's own `json_schema`, plus the OpenAI fields that change nothing here (`response_format`,
`model`, `user`: checked, then dropped). So the schema the fuzzer reads and the checks the server
runs come from one place.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ..runtime.request import (
    CheckedRequest,
    RequestContract,
    RequestError,
    check_choice,
    check_text,
    nullable_schema,
)

REQUEST_SCHEMA = "ImageGenerationRequest"
MAX_USER_CHARS = 256
NOT_JSON = "the request body is not valid JSON"
NOT_AN_OBJECT = "the request body must be a JSON object (Content-Type: application/json)"


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param"[, "code"]}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers, self.code = headers or {}, code

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        if self.code is not None:  # OpenAI's machine-readable reason, e.g. "invalid_api_key"
            error["code"] = self.code
        return {"error": error}


# -- responses (for the OpenAPI schema) ----------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


# -- requests --------------------------------------------------------------------------------------
def request_schema(contract: RequestContract, model_id: str) -> dict[str, Any]:
    """The JSON Schema of POST /v1/images/generations' body for this bundle."""
    schema = contract.json_schema()
    schema["title"] = REQUEST_SCHEMA
    schema["properties"].update(
        response_format=nullable_schema({"type": "string", "enum": ["b64_json"]}, "Only b64_json (PNG)."),
        model=nullable_schema({"type": "string", "enum": [model_id]}, "The served bundle's id."),
        user=nullable_schema(
            {"type": "string", "maxLength": MAX_USER_CHARS}, "Accepted and ignored (OpenAI)."
        ),
    )
    return schema


def parse_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (a missing Content-Type is taken for JSON)."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(400, NOT_AN_OBJECT)
    if not body.strip():
        raise ApiError(400, NOT_AN_OBJECT)
    try:
        text = body.decode("utf-8")  # RFC 8259, 8.1: JSON between systems is UTF-8 (json.loads guesses)
    except UnicodeDecodeError:
        raise ApiError(400, f"{NOT_JSON} (it is not UTF-8)") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ApiError(400, f"{NOT_JSON} (it is nested too deeply)") from None
    except ValueError:  # JSONDecodeError; an integer of more than 4300 digits
        raise ApiError(400, NOT_JSON) from None
    if not isinstance(value, dict):
        raise ApiError(400, NOT_AN_OBJECT)
    return value


def check_request(contract: RequestContract, model_id: str, fields: dict[str, Any]) -> CheckedRequest:
    """The contract's verdict on a body, as a 400 naming the field at fault."""
    fields = dict(fields)
    try:
        # OpenAI's fields that change nothing here: checked, then dropped
        for name, check in (
            ("response_format", lambda v: check_choice("response_format", v, ("b64_json",))),
            ("model", lambda v: check_choice("model", v, (model_id,))),
            ("user", lambda v: check_text("user", v, MAX_USER_CHARS)),
        ):
            value = fields.pop(name, None)
            if value is not None:
                check(value)
        return contract.check(fields)
    except RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param) from None
