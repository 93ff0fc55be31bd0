"""The HTTP API's request and response shapes, and every check a request must pass.

The request model is built per bundle, so that the OpenAPI schema lists the real sizes, plans,
`n` limit and (for DiT) class range: clients and the fuzzer see exactly what the server accepts.
Checks that need the tokenizer (prompt length in tokens) run after pydantic, in `Validator`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import ConfigError
from ..runtime.bundle import Bundle
from ..runtime.generator import DEFAULT_GUIDANCE, Request
from ..runtime.prompts import PromptLimit

MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000  # a cheap bound before tokenizing; the token limit is the real one


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
@dataclass(frozen=True)
class Limits:
    """What this server accepts, from the bundle and the serve options."""

    model_id: str
    architecture: str
    sizes: tuple[str, ...]  # "WxH", OpenAI's order
    plans: tuple[str, ...]
    default_plan: str
    max_n: int
    max_tokens: int  # 0: the model takes no prompt (DiT)
    num_classes: int

    @classmethod
    def from_bundle(cls, bundle: Bundle, max_n: int, default_plan: str | None = None) -> Limits:
        plans = tuple(bundle.plan_names)
        default_plan = default_plan or bundle.default_plan
        return cls(
            model_id=bundle.path.resolve().name,
            architecture=bundle.architecture,
            sizes=tuple(f"{w}x{h}" for h, w in bundle.manifest.resolutions),
            plans=plans,
            default_plan=default_plan,
            max_n=max_n,
            max_tokens=bundle.manifest.tokenizer.max_length if bundle.manifest.tokenizer else 0,
            num_classes=int(bundle.model.get("num_classes", 0)),
        )

    @property
    def is_dit(self) -> bool:
        return self.architecture == "dit"


def request_model(limits: Limits) -> type[BaseModel]:
    """The pydantic model of POST /v1/images/generations for this bundle (strict JSON types)."""
    tokens = f"at most {limits.max_tokens} tokens (longer is refused, not truncated)"
    fields: dict[str, Any] = {
        "prompt": (str, Field("", max_length=MAX_PROMPT_CHARS, description="Ignored by DiT models."))
        if limits.is_dit
        else (str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description=f"The prompt, {tokens}.")),
        "n": (int, Field(1, ge=1, le=limits.max_n, description="Images; seeds seed, seed+1, ...")),
        "size": (
            Literal[limits.sizes] | None,  # type: ignore[valid-type]
            Field(
                None, description=f"WIDTHxHEIGHT, one the bundle was built for (default {limits.sizes[0]})."
            ),
        ),
        "response_format": (Literal["b64_json"] | None, Field(None, description="Only b64_json (PNG).")),
        "model": (Literal[limits.model_id] | None, Field(None, description="The served bundle's id.")),  # type: ignore[valid-type]
        "user": (str | None, Field(None, max_length=256, description="Accepted and ignored (OpenAI).")),
        "plan": (
            Literal[limits.plans] | None,  # type: ignore[valid-type]
            Field(None, description=f"A bundled step plan (default {limits.default_plan})."),
        ),
        "guidance_scale": (
            float | None,
            Field(
                None,
                ge=0.0,
                le=MAX_GUIDANCE,
                allow_inf_nan=False,
                description="Classifier-free guidance; <= 1 disables it (default 4.5 PixArt, 4.0 DiT).",
            ),
        ),
        "seed": (
            int | None,
            Field(None, ge=0, le=MAX_SEED, description="Initial noise seed (default: random)."),
        ),
    }
    if limits.is_dit:
        fields["class_label"] = (
            int,
            Field(ge=0, le=limits.num_classes - 1, description="ImageNet class id (required)."),
        )
    else:
        fields["negative_prompt"] = (
            str,
            Field("", max_length=MAX_PROMPT_CHARS, description=f"Negative prompt, {tokens}."),
        )
    return create_model(
        "ImageGenerationRequest",
        __config__=ConfigDict(strict=True, extra="forbid"),  # "3" is not 3, unknown keys are errors
        **fields,
    )


@dataclass
class Generation:
    """A validated request: one engine Request per image, and how to batch them."""

    plan: str
    requests: list[Request]

    @property
    def guided(self) -> bool:
        return self.requests[0].guidance_scale > 1.0


class Validator:
    """The checks pydantic cannot do: prompt length in the bundle's tokenizer's tokens."""

    def __init__(self, bundle: Bundle, limits: Limits) -> None:
        self.limits = limits
        self.prompts = PromptLimit(bundle)

    def check_text(self, text: str, param: str) -> None:
        """Refuse text that is not UTF-8, or longer than the model reads."""
        try:
            text.encode("utf-8")  # lone surrogates ("\ud800" in JSON) are not text
        except UnicodeEncodeError:
            raise ApiError(400, f"{param} is not valid UTF-8 text", param=param) from None
        try:
            self.prompts.check(text, param)
        except ConfigError as exc:
            raise ApiError(400, str(exc), param=param) from None

    def generation(self, body: BaseModel) -> Generation:
        data = body.model_dump()
        limits = self.limits
        if not limits.is_dit:  # DiT ignores the prompt (OpenAI clients always send one)
            if not data["prompt"].strip():
                raise ApiError(400, "prompt must not be empty", param="prompt")
            self.check_text(data["prompt"], "prompt")
            self.check_text(data["negative_prompt"], "negative_prompt")
        width, height = map(int, (data["size"] or limits.sizes[0]).split("x"))
        guidance = data["guidance_scale"]
        if guidance is None:
            guidance = DEFAULT_GUIDANCE.get(limits.architecture, 4.5)
        seed = data["seed"] if data["seed"] is not None else secrets.randbelow(MAX_SEED + 1)
        requests = [
            Request(
                prompt=data["prompt"],
                negative_prompt=data.get("negative_prompt", ""),
                class_label=data.get("class_label"),
                guidance_scale=float(guidance),
                seed=seed + i,  # n images: seeds seed, seed+1, ... (numpy takes any int >= 0)
                height=height,
                width=width,
            )
            for i in range(data["n"])
        ]
        return Generation(data["plan"] or limits.default_plan, requests)


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's RequestValidationError (pydantic errors) as one OpenAI-style 400."""
    if not errors:
        return ApiError(400, "invalid request")
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    if not loc:  # no body, or not an object (a list, a string, a non-JSON content type)
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
    param = ".".join(loc)
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown parameter {param!r}", param=param)
    return ApiError(400, f"{param}: {error.get('msg', 'invalid value')}", param=loc[0])
