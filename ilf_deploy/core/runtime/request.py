"""The request contract: what a generation request may ask for, checked in one place.

Every front door (`ilf-deploy generate`, `serve`'s HTTP API, the Triton model, any later one) hands
the fields it received, as raw values, to `RequestContract.check`. It returns the engine `Request`s,
or raises a `RequestError` (its `param` and `message`) for the first bad field, with the same text
whatever the front door (templates in `MESSAGES`; docs/serving.md ("Request limits") lists them all). Defaults
(size, guidance) are `Generator.resolve`'s; a missing seed is drawn at random in 0..MAX_SEED.

Cheap checks come first: a prompt's characters are counted before it is tokenised, and tokens are
counted (in the bundle's own tokenizer, as `BundleGenerator.encode_prompt` sees them, before its
truncation) only once every other field has passed. `json_schema` publishes the same limits as JSON
Schema (serve's OpenAPI): integers accept integral JSON numbers (2.0), as JSON Schema's `integer`
does; booleans are not numbers.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, Request

# The limits, the verdicts' messages and the blank characters live in one data file that the C++
# runtime embeds too (cpp/CMakeLists.txt): both languages refuse the same requests in the same words.
CONTRACT: dict[str, Any] = json.loads(
    resources.files("ilf_deploy.core.schemas").joinpath("request-contract.json").read_text(encoding="utf-8")
)
MAX_PROMPT_CHARS: int = CONTRACT["limits"]["max_prompt_chars"]  # prompt and negative_prompt, untokenised
MAX_SEED: int = CONTRACT["limits"]["max_seed"]
MAX_GUIDANCE = float(CONTRACT["limits"]["max_guidance"])
MAX_SIDE: int = CONTRACT["limits"]["max_side"]  # pixels: PixArt-Σ's largest (4K); 100000 fills the memory
# JSON Schema `format` of prompts: text of at most the model's tokens (GET /v1/models:
# max_prompt_tokens), which no JSON Schema keyword can say.
PROMPT_FORMAT = "ilf-prompt"
# str.isspace's characters: a prompt of only these is empty once stripped (as every encoder does);
# NOT_BLANK, the JSON Schema pattern of a prompt, is any other character (the same in every regex engine).
SPACES: str = CONTRACT["spaces"]
NOT_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

FIELDS = (
    "prompt",
    "negative_prompt",
    "class_label",
    "n",
    "size",
    "plan",
    "quality",
    "guidance_scale",
    "seed",
)
TEXT_FIELDS = ("prompt", "negative_prompt")
NULLABLE = frozenset({"size", "plan", "quality", "guidance_scale", "seed"})  # null: as if omitted
AUTO_SIZE = "auto"  # OpenAI's "let the model choose": the bundle's default size
# OpenAI's `quality` -> which of the bundle's plans (docs/serving.md ("OpenAI compatibility")): "cheapest" and
# "dearest" by block forwards (ties: the first in the bundle), "default" the server's default plan.
# An explicit `plan` wins over `quality`.
QUALITY_PLANS = {
    "low": "cheapest",
    "medium": "default",
    "auto": "default",
    "standard": "default",  # DALL-E 3's
    "high": "dearest",
    "hd": "dearest",  # DALL-E 3's
    "xhigh": "dearest",
    "max": "dearest",
}

# The verdicts, one message each; `{param}` is the field. docs/serving.md ("Request limits") shows every one.
MESSAGES: dict[str, str] = CONTRACT["messages"]


class RequestError(ConfigError):
    """A refused request: the field at fault (`param`) and the one-line reason."""

    def __init__(self, verdict: str, param: str, **values: Any) -> None:
        self.verdict, self.param = verdict, param
        self.message = MESSAGES[verdict].format(param=param, **values)
        super().__init__(self.message)


@dataclass(frozen=True)
class Size:
    """An image size from a front door with separate height and width fields (Triton, the CLI);
    None: the generator's default. HTTP clients send "WxH" strings instead."""

    height: Any = None
    width: Any = None


@dataclass
class CheckedRequest:
    """An accepted request: its plan (None: the front door resolves it) and one Request per image,
    resolved by the generator (size and guidance decided), with seeds seed, seed+1, ..."""

    plan: str | None
    requests: list[Request]

    @property
    def guided(self) -> bool:
        return float(self.requests[0].guidance_scale or 0.0) > 1.0


_MISSING = object()


def json_kind(value: Any) -> str:
    """How a refused value is named in a message (JSON's words: a front door may be HTTP)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str | bytes):
        return "a string"
    if isinstance(value, numbers.Real):
        return f"{float(value):g}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


def check_integer(param: str, value: Any) -> int:
    """An integer, or an integral number (2.0, as JSON Schema's `integer`); never a boolean."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise RequestError("type", param, kind="an integer", got=json_kind(value))


def check_number(param: str, value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise RequestError("type", param, kind="a number", got=json_kind(value))


def check_text(param: str, value: Any, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A string (UTF-8 bytes are decoded) of at most `max_chars` characters."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("utf8", param) from None
    if not isinstance(value, str):
        raise RequestError("type", param, kind="a string", got=json_kind(value))
    if len(value) > max_chars:
        raise RequestError("chars", param, count=len(value), limit=max_chars)
    try:
        value.encode("utf-8")  # lone surrogates ("\ud800" in JSON) are not text
    except UnicodeEncodeError:
        raise RequestError("utf8", param) from None
    return value


def check_choice(param: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of `choices` (a front door's own enumerations too, e.g. serve's response_format)."""
    if not isinstance(value, str):
        raise RequestError("type", param, kind="a string", got=json_kind(value))
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise RequestError("type", param, kind=f"one of {allowed}", got=repr(value[:100]))
    return value


def bundle_token_limit(bundle: Bundle) -> tuple[Callable[[str], int] | None, int]:
    """(a prompt's length in tokens as `BundleGenerator.encode_prompt` sees it before truncation, the
    most tokens the text encoder reads); (None, 0) for class-conditional bundles (no tokenizer).

    PixArt and Sana: the bundle's tokenizer, on the lower-cased prompt. SD3 and Flux (several
    tokenizers): the one that reads the most (T5), on the prompt as is; the CLIP encoders read its
    first 77 tokens, as in diffusers' pipelines, so only what T5 would drop is refused."""
    manifest = bundle.manifest
    if manifest.tokenizer is not None:
        spec, lower = manifest.tokenizer, True
    elif manifest.tokenizers:
        spec, lower = max(manifest.tokenizers, key=lambda t: t.max_length), False
    else:
        return None, 0
    tokenizer = bundle.tokenizer(spec)
    tokenizer.no_truncation()  # the count must see what truncation would drop
    tokenizer.no_padding()
    if lower:
        return (lambda text: len(tokenizer.encode(text.lower().strip()).ids)), spec.max_length
    return (lambda text: len(tokenizer.encode(text).ids)), spec.max_length


def nullable_schema(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """`schema` or null (null: as if omitted), for JSON Schema."""
    return {"anyOf": [schema, {"type": "null"}], "default": None, "description": description}


def _wxh(height: int, width: int) -> str:
    return f"{width}x{height}"  # OpenAI's order


@dataclass(frozen=True)
class RequestContract:
    """What one model accepts. Build it with `for_bundle` (servers) or `for_generator`."""

    architecture: str
    resolve: Callable[[Request], Request]  # Generator.resolve: the defaults, decided in one place
    plans: tuple[str, ...] | None = None  # None: any plan the front door resolves (model directories)
    default_plan: str | None = None
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width); (): any the generator takes
    num_classes: int = 0
    max_n: int = 1
    max_tokens: int = 0
    count_tokens: Callable[[str], int] | None = None
    guidance: str = "cfg"  # ModelFacts.guidance: "cfg", "embedded" (Flux.1-dev) or "none" (schnell)
    plan_forwards: tuple[int, ...] = ()  # each plan's block forwards (`quality` picks by them)
    # A spec that is not one of `plans`: the front door's plan resolver (backends.plans.PlanBook.check)
    # decides, raising its one-line RequestError; None: only `plans`.
    check_plan: Callable[[str], None] | None = None

    @classmethod
    def for_generator(
        cls,
        generator: Generator,
        plans: tuple[str, ...] | None = None,
        default_plan: str | None = None,
        max_n: int = 1,
        count_tokens: Callable[[str], int] | None = None,
        max_tokens: int = 0,
    ) -> RequestContract:
        """The generator's model facts (architecture, classes, sizes) and its `resolve`."""
        facts = generator.facts
        return cls(
            architecture=facts.architecture,
            resolve=generator.resolve,
            plans=plans,
            default_plan=default_plan,
            sizes=tuple(facts.resolutions),
            num_classes=facts.num_classes,
            max_n=max_n,
            max_tokens=max_tokens if count_tokens is not None else 0,
            count_tokens=count_tokens,
            guidance=facts.guidance,
        )

    @classmethod
    def for_bundle(
        cls,
        bundle: Bundle,
        generator: Generator,
        max_n: int = 1,
        default_plan: str | None = None,
        check_plan: Callable[[str], None] | None = None,
    ) -> RequestContract:
        """The bundle's plans (default: `default_plan`, else `Bundle.default_plan`), sizes and tokenizer;
        with `check_plan` (the plan resolver), any spec it accepts too, `default_plan` included."""
        if default_plan is not None and default_plan not in bundle.plan_names and check_plan is None:
            raise ConfigError(
                f"default plan {default_plan!r} is not in the bundle (it has: {', '.join(bundle.plan_names)})"
            )
        contract = cls.for_generator(
            generator,
            tuple(bundle.plan_names),
            default_plan or bundle.default_plan,
            max_n,
            *bundle_token_limit(bundle),
        )
        forwards = tuple(bundle.plan(name).block_forwards for name in bundle.plan_names)
        return replace(contract, plan_forwards=forwards, check_plan=check_plan)

    @property
    def is_dit(self) -> bool:
        return self.architecture == "dit"

    def warmup_request(self) -> tuple[str, Request]:
        """A server's warm-up image (`generator.warm_up`): the default plan and size, guided as by
        default (the common batch shape)."""
        request = Request(prompt="" if self.is_dit else "warm up", class_label=0 if self.is_dit else None)
        assert self.default_plan is not None
        return self.default_plan, self.resolve(request)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields this model takes: DiT has class labels, the text models prompts; a negative
        prompt needs classifier-free guidance (not Flux), a guidance scale some guidance (not schnell)."""
        skip = {"negative_prompt"} if self.is_dit or self.guidance != "cfg" else set()
        skip |= set() if self.is_dit else {"class_label"}
        skip |= {"guidance_scale"} if self.guidance == "none" else set()
        return tuple(f for f in FIELDS if f not in skip)

    @property
    def model_kind(self) -> str:
        """The model as a refusal names it."""
        return {
            "embedded": f"{self.architecture} models (their guidance is embedded, not classifier-free)",
            "none": f"{self.architecture} models without guidance (schnell)",
        }.get(self.guidance, f"{self.architecture} models")

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(_wxh(h, w) for h, w in self.sizes)

    # -- the check -------------------------------------------------------------------------------
    def check(self, fields: Mapping[str, Any]) -> CheckedRequest:
        """The request `fields` (raw values; absent = omitted) -> accepted, or RequestError."""
        for name in fields:
            if name not in FIELDS:
                raise RequestError("unknown", str(name)[:100])
            if name not in self.fields:
                guidance_field = name in ("negative_prompt", "guidance_scale") and not self.is_dit
                kind = self.model_kind if guidance_field else f"{self.architecture} models"
                raise RequestError("not_for_model", name, architecture=kind)

        def get(name: str) -> Any:
            value = fields.get(name, _MISSING)
            return _MISSING if value is None and name in NULLABLE else value

        texts = {name: self._text(name, get(name)) for name in TEXT_FIELDS if name in self.fields}
        class_label = self._class_label(get("class_label")) if self.is_dit else None
        n = self._n(get("n"))
        height, width = self._size(get("size"))
        plan = self._plan(get("plan"), get("quality"))
        guidance = self._guidance(get("guidance_scale"))
        seed = self._seed(get("seed"))
        for name, text in texts.items():
            self._tokens(name, text)
        request = self.resolve(
            Request(
                texts["prompt"], texts.get("negative_prompt", ""), class_label, guidance, seed, height, width
            )
        )
        if self.sizes and (request.height, request.width) not in self.sizes:
            size = _wxh(request.height or 0, request.width or 0)
            raise RequestError("size", "size", sizes=", ".join(self.size_names), size=size)
        return CheckedRequest(plan, [replace(request, seed=seed + i) for i in range(n)])

    def _text(self, name: str, value: Any) -> str:
        if value is _MISSING:
            if name == "prompt" and not self.is_dit:
                raise RequestError("required", name)
            return ""
        text = check_text(name, value)
        if name == "prompt" and not self.is_dit and not text.strip():
            raise RequestError("empty", name)
        return text

    def _tokens(self, name: str, text: str) -> None:
        if self.count_tokens is None or self.is_dit or not text:  # DiT ignores its prompt
            return
        count = self.count_tokens(text)
        if count > self.max_tokens:
            raise RequestError("tokens", name, count=count, limit=self.max_tokens)

    def _class_label(self, value: Any) -> int:
        if value is _MISSING:
            raise RequestError("required", "class_label")
        label = check_integer("class_label", value)
        if not 0 <= label < self.num_classes:
            raise RequestError("class_label", "class_label", limit=self.num_classes - 1, value=label)
        return label

    def _n(self, value: Any) -> int:
        if value is _MISSING:
            return 1
        n = check_integer("n", value)
        if not 1 <= n <= self.max_n:
            raise RequestError("n", "n", limit=self.max_n, value=n)
        return n

    def _size(self, value: Any) -> tuple[int | None, int | None]:
        if value is _MISSING or value == AUTO_SIZE:
            return None, None
        if isinstance(value, Size):
            sides = [("height", value.height), ("width", value.width)]
            checked = [(name, None if v is None else check_integer(name, v)) for name, v in sides]
        else:
            example = self.size_names[0] if self.sizes else "512x512"
            match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", value) if isinstance(value, str) else None
            if match is None:
                got = repr(value[:100]) if isinstance(value, str) else json_kind(value)
                raise RequestError("size_form", "size", example=example, got=got)
            checked = [("size", int(match[2])), ("size", int(match[1]))]
        for name, side in checked:  # 0 is refused, not taken for "the default"
            if side is not None and not 1 <= side <= MAX_SIDE:
                raise RequestError("side", name, limit=MAX_SIDE, value=side)
        return checked[0][1], checked[1][1]

    def _plan(self, value: Any, quality: Any = _MISSING) -> str | None:
        if value is _MISSING:
            if quality is _MISSING:
                return self.default_plan
            return self.quality_plan(check_choice("quality", quality, tuple(QUALITY_PLANS)))
        plan = check_text("plan", value, 256)
        if self.plans is not None and plan not in self.plans and plan != self.default_plan:
            if self.check_plan is None:
                raise RequestError("plan", "plan", value=plan, plans=", ".join(self.plans))
            self.check_plan(plan)
        return plan

    def _guidance(self, value: Any) -> float | None:
        if value is _MISSING:
            return None  # Generator.resolve decides
        guidance = check_number("guidance_scale", value)
        if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
            raise RequestError("guidance_scale", "guidance_scale", limit=MAX_GUIDANCE, value=guidance)
        return guidance

    def _seed(self, value: Any) -> int:
        if value is _MISSING:
            return secrets.randbelow(MAX_SEED + 1)
        seed = check_integer("seed", value)
        if seed < 0:
            raise RequestError("seed_low", "seed", value=seed)
        if seed > MAX_SEED:
            raise RequestError("seed_high", "seed", limit=MAX_SEED, value=seed)
        return seed

    def quality_plan(self, quality: str) -> str | None:
        """The plan OpenAI's `quality` names here (QUALITY_PLANS)."""
        rank = QUALITY_PLANS[quality]
        if rank == "default" or self.plans is None or len(self.plan_forwards) != len(self.plans):
            return self.default_plan
        pick = min if rank == "cheapest" else max
        return self.plans[pick(range(len(self.plans)), key=lambda i: self.plan_forwards[i])]

    # -- the same limits as JSON Schema ----------------------------------------------------------
    def json_schema(self) -> dict[str, Any]:
        """The request object's JSON Schema (draft 2020-12, OpenAPI 3.1): what `check` accepts,
        but for the token limit, which the `format` names (a fuzzer must be taught it)."""
        properties = self._model_schemas()
        properties["n"] = {
            "type": "integer",
            "minimum": 1,
            "maximum": self.max_n,
            "default": 1,
            "description": "Images; seeds seed, seed+1, ...",
        }
        sizes = (
            {"enum": [*self.size_names, AUTO_SIZE]}
            if self.sizes
            else {"pattern": f"^([0-9]{{1,5}}x[0-9]{{1,5}}|{AUTO_SIZE})$"}
        )
        plans = {"enum": list(self.plans)} if self.plans is not None and self.check_plan is None else {}
        optional = {
            "size": (sizes, "WIDTHxHEIGHT, one the bundle was built for; auto or default: the first"),
            "plan": (
                plans,
                f"A bundled step plan (default {self.default_plan})"
                + (", auto, or a preset (base-N, ilf-N, cache-N, ...)" if self.check_plan else ""),
            ),
            "quality": (
                {"enum": list(QUALITY_PLANS)},
                "OpenAI's quality, mapped to a plan: low the fewest block forwards, high/hd/xhigh/max "
                "the most, medium/standard/auto the default plan; `plan` wins over it",
            ),
            "guidance_scale": (
                {"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE},
                "Classifier-free guidance; <= 1 disables it (default: the model's, 4.5 PixArt, 4.0 DiT)",
            ),
            "seed": (
                {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                "Initial noise seed (default: random)",
            ),
        }
        for name, (schema, description) in optional.items():
            properties[name] = nullable_schema({"type": "string", **schema}, description)
        return {
            "type": "object",
            "properties": properties,
            "required": ["class_label"] if self.is_dit else ["prompt"],
            "additionalProperties": False,
        }

    def _model_schemas(self) -> dict[str, Any]:
        """The fields of the model kind: DiT's class label, PixArt's prompts."""
        text = {"type": "string", "maxLength": MAX_PROMPT_CHARS}
        if self.is_dit:
            label = {"type": "integer", "minimum": 0, "maximum": self.num_classes - 1}
            return {
                "prompt": {**text, "default": "", "description": "Ignored by DiT models."},
                "class_label": {**label, "description": "ImageNet class id (required)."},
            }
        tokens = f"at most {self.max_tokens} tokens in the model's tokenizer (format {PROMPT_FORMAT})"
        prompt = {**text, "minLength": 1, "pattern": NOT_BLANK, "format": PROMPT_FORMAT}
        return {
            "prompt": {
                **prompt,
                "description": f"The prompt: not blank, at most {MAX_PROMPT_CHARS} characters and {tokens}.",
            },
            "negative_prompt": {
                **text,
                "format": PROMPT_FORMAT,
                "default": "",
                "description": f"Negative prompt: at most {MAX_PROMPT_CHARS} characters and {tokens}.",
            },
        }
