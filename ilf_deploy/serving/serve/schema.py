"""The HTTP API's shapes: the request body (read here, checked by the runtime's request contract),
the responses and the OpenAI-style errors.

Every limit of a generation request is `ilf_deploy.core.runtime.request.RequestContract`'s, which
`generate` and the Triton model use too; the request's JSON Schema in the OpenAPI document is the
contract's own `json_schema`, plus OpenAI's fields that shape the response or change nothing here
(`OPENAI_FIELDS`: checked, then used or dropped). So the schema the fuzzer reads and the checks the
server runs come from one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ilf_deploy.core.runtime.request import (
    CheckedRequest,
    RequestContract,
    RequestError,
    check_choice,
    check_integer,
    check_text,
    json_kind,
    nullable_schema,
)

REQUEST_SCHEMA = "ImageGenerationRequest"
MAX_USER_CHARS = 256
NOT_JSON = "the request body is not valid JSON"
NOT_AN_OBJECT = "the request body must be a JSON object (Content-Type: application/json)"
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "webp", "jpeg")  # PIL's writers; OpenAI's gif and svg are refused


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
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


# -- requests --------------------------------------------------------------------------------------
# OpenAI's image-generation fields beyond the request contract's (docs/serving.md ("OpenAI compatibility")):
# each is checked (a bad value is a 400 naming it), then either shapes the response (`ResponseForm`)
# or is ignored as OpenAI documents for models that lack it. None of them is ever an unknown field.
_STRING, _INTEGER, _BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
OPENAI_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "response_format": (
        {"enum": list(RESPONSE_FORMATS)},
        "b64_json (default) or url: a link to GET /v1/images/files/{id}, valid for --url-ttl-s",
    ),
    "output_format": ({"enum": list(OUTPUT_FORMATS)}, "png (default), webp or jpeg"),
    "output_compression": (
        {"type": "integer", "minimum": 0, "maximum": 100},
        "webp/jpeg compression 0..100 (default 100: the best quality)",
    ),
    "stream": (_BOOLEAN, "Server-sent events: image_generation.completed per image, then [DONE]"),
    "partial_images": (
        {"type": "integer", "minimum": 0, "maximum": 3},
        "Accepted; no partial image is sent (OpenAI allows the final image to come first)",
    ),
    "model": (_STRING, "The served model's id (GET /v1/models; serve --model-name)"),
    "style": (
        {"enum": ["vivid", "natural"]},
        "Accepted and ignored (DALL-E 3's; describe style in the prompt)",
    ),
    "background": ({"enum": ["auto", "opaque"]}, "auto or opaque (images are RGB; transparent is refused)"),
    "moderation": ({"enum": ["auto", "low"]}, "Accepted and ignored (no moderation here)"),
    "complexity": ({"enum": ["low", "medium", "high"]}, "Accepted and ignored"),
    "user": ({"type": "string", "maxLength": MAX_USER_CHARS}, "Accepted and ignored"),
    "safety_identifier": ({"type": "string", "maxLength": MAX_USER_CHARS}, "Accepted and ignored"),
    "frame_count": (_INTEGER, "Accepted and ignored (GIF output only, which is not made here)"),
    "frame_duration_ms": (_INTEGER, "Accepted and ignored (GIF output only)"),
    "svg": ({"type": "object"}, "Accepted and ignored (SVG output only, which is not made here)"),
}


@dataclass(frozen=True)
class ResponseForm:
    """How a request's images are answered: inline or as links, their file format, streamed or not."""

    response_format: str = "b64_json"
    output_format: str = "png"
    compression: int = 100
    stream: bool = False


def request_schema(contract: RequestContract, model_id: str) -> dict[str, Any]:
    """The JSON Schema of POST /v1/images/generations' body for this bundle."""
    schema = contract.json_schema()
    schema["title"] = REQUEST_SCHEMA
    for name, (field_schema, description) in OPENAI_FIELDS.items():
        if name == "model":
            field_schema = {"type": "string", "enum": [model_id]}
        schema["properties"][name] = nullable_schema(field_schema, description)
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


def _check_openai_field(name: str, value: Any, model_id: str) -> Any:
    """One OpenAI field's value, checked against its schema in OPENAI_FIELDS."""
    schema = OPENAI_FIELDS[name][0]
    if name == "model":
        return check_choice(name, value, (model_id,))
    if "enum" in schema:
        return check_choice(name, value, tuple(schema["enum"]))
    if schema.get("type") == "string":
        return check_text(name, value, schema["maxLength"])
    if schema.get("type") == "boolean":
        if not isinstance(value, bool):
            raise RequestError("type", name, kind="a boolean", got=json_kind(value))
        return value
    if schema.get("type") == "object":
        if not isinstance(value, dict):
            raise RequestError("type", name, kind="an object", got=json_kind(value))
        return value
    number = check_integer(name, value)
    low, high = schema.get("minimum"), schema.get("maximum")
    if (low is not None and number < low) or (high is not None and number > high):
        raise RequestError("type", name, kind=f"an integer in {low}..{high}", got=str(number))
    return number


def check_request(
    contract: RequestContract, model_id: str, fields: dict[str, Any]
) -> tuple[CheckedRequest, ResponseForm]:
    """The contract's verdict on a body and how to answer it, or a 400 naming the field at fault."""
    fields = dict(fields)
    try:
        given = {}
        for name in OPENAI_FIELDS:
            value = fields.pop(name, None)
            if value is not None:  # null: as if omitted
                given[name] = _check_openai_field(name, value, model_id)
        form = ResponseForm(
            given.get("response_format", "b64_json"),
            given.get("output_format", "png"),
            given.get("output_compression", 100),
            given.get("stream", False),
        )
        return contract.check(fields), form
    except RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param) from None
