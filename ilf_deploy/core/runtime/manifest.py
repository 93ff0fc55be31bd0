"""The bundle manifest, typed: what `Bundle.load` parses and validates once, and every reader uses.

The JSON form is specified by `ilf_deploy/core/schemas/manifest.schema.json` (`ilf-deploy schema
manifest`); `Manifest.parse` checks a document against that schema, then the facts a schema cannot
say (every referenced file is listed and hashed, segments match the cut points), and builds these
frozen dataclasses. Nothing else reads the raw dict. Writers (`build`, `calibrate`, `quantize`,
`build-engines`) edit the JSON through `bundle.rewrite_manifest`, which re-parses what they wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ilf_deploy.core.errors import IlfError
from ilf_deploy.core.schemas import problem

SCHEMA_VERSION = 2  # what a bundle is written as unless it holds something newer (schema_version_for)
BF16_SCHEMA_VERSION = 3  # 3 adds the "bf16" variant mode and its `precision_policy`
STATE_SCHEMA_VERSION = 4  # 4 adds a multi-tensor state (MMDiTs: SD3, Flux) and several tokenizers
# 5 adds a prompt format (Sana: `tokenizer.instruction`; the text encoder also returns the mask it keeps)
INSTRUCTION_SCHEMA_VERSION = 5
# 6 adds converted tokenizers to schema 4's `tokenizers` (each `openvino`: the C++ runtime's, SD3/Flux)
CONVERTED_TOKENIZERS_SCHEMA_VERSION = 6
# 7 adds the `cross_kv` segment, which a reader runs after `context` (below)
CROSS_KV_SCHEMA_VERSION = 7
SCHEMA_VERSIONS = (
    SCHEMA_VERSION,
    BF16_SCHEMA_VERSION,
    STATE_SCHEMA_VERSION,
    INSTRUCTION_SCHEMA_VERSION,
    CONVERTED_TOKENIZERS_SCHEMA_VERSION,
    CROSS_KV_SCHEMA_VERSION,
)
# The segment that projects the caption into every block's cross-attention keys and values once per
# generation (build/export/cross_kv.py): it runs after `context` on its outputs, and its outputs join
# the conditioning the block segments read.
CROSS_KV_SEGMENT = "cross_kv"
MODEL_STATE_FIELDS = ("state", "state_init", "token_layout", "guidance", "position_ids")  # schema 4


def schema_version_for(manifest: Mapping[str, Any]) -> int:
    """The oldest version that says what `manifest` (the JSON) holds: 7 with a `cross_kv` segment,
    6 with several tokenizers of which one is converted for OpenVINO, 5 with a prompt format (Sana's
    instruction), 4 with a multi-tensor state or several tokenizers, 3 with a bf16 variant, else 2,
    so every other bundle stays readable by readers of 2 (the C++ runtime)."""
    if CROSS_KV_SEGMENT in (manifest.get("segments") or {}):
        return CROSS_KV_SCHEMA_VERSION
    tokenizer = manifest.get("tokenizer") or {}
    if any("openvino" in spec for spec in manifest.get("tokenizers") or ()):
        return CONVERTED_TOKENIZERS_SCHEMA_VERSION
    if "instruction" in tokenizer:
        return INSTRUCTION_SCHEMA_VERSION
    model = manifest.get("model") or {}
    if manifest.get("tokenizers") or any(key in model for key in MODEL_STATE_FIELDS):
        return STATE_SCHEMA_VERSION
    variants = manifest.get("variants") or {}
    modes = {v.get("mode") for v in variants.values() if isinstance(v, Mapping)}
    return BF16_SCHEMA_VERSION if "bf16" in modes else SCHEMA_VERSION


class BundleError(IlfError):
    """A bundle that is missing, corrupted, or from an incompatible version."""


# Which engines run a variant, by its mode: decided here and nowhere else. The first is the one a
# command opens by default; an engine not listed refuses the variant in one line (SegmentRunner).
VARIANT_ENGINES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "int8-dynamic": ("onnxruntime",),  # ORT's dynamic-quantization operators
        "int8-qdq": ("onnxruntime", "openvino", "tensorrt"),  # standard Q/DQ ONNX
        "fp8-qdq": ("onnxruntime", "tensorrt"),  # FP8 Q/DQ: TensorRT on the GPU, ORT emulates it
        "int8-ov": ("openvino",),  # OpenVINO IR written by NNCF
        "bf16": ("openvino",),  # the bundle's own ONNX; OpenVINO's bf16 hint on exactly its segments
    }
)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


def _non_finite(value: Any) -> Any:
    """The manifest writes non-finite floats as strings (strict JSON; bundle.strict_json)."""
    return float(value) if value in ("inf", "-inf", "nan") else value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # symbolic dims are strings
    dtype: str  # numpy's name, e.g. "float32"

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class SegmentSpec:
    """One exported graph: its file, named inputs and outputs, the blocks it covers (if any)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    blocks: tuple[int, int] | None

    @classmethod
    def parse(cls, name: str, d: Mapping[str, Any]) -> SegmentSpec:
        blocks = d["blocks"]
        return cls(
            name,
            d["file"],
            tuple(TensorSpec.parse(t) for t in d["inputs"]),
            tuple(TensorSpec.parse(t) for t in d["outputs"]),
            None if blocks is None else (int(blocks[0]), int(blocks[1])),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def takes_feed(self) -> bool:
        """An inner-loop block segment: it adds the feedback's `feed` before each block (eqs. 2–3)."""
        return "feed" in self.input_names

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "blocks": None if self.blocks is None else list(self.blocks),
        }


@dataclass(frozen=True)
class ModelSpec:
    num_blocks: int
    latent_channels: int
    out_channels: int
    patch_size: int
    sample_size: int
    vae_scale_factor: int
    default_image_size: int
    context_inputs: tuple[str, ...]
    uses_size_conditions: bool
    num_classes: int = 0  # DiT: class labels 0..num_classes-1; num_classes is the null class
    id2label: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Schema 4 (model/adapters/base.py declares these): the state between blocks, the state tensors a
    # conditioning entry starts, the final tokens' patch layout, how guidance reaches the model,
    # and Flux's position ids.
    state: tuple[str, ...] = ("hidden",)
    state_init: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    token_layout: str = "patch"
    guidance: str = "cfg"
    position_ids: bool = False

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(
            **{k: d[k] for k in _MODEL_INTS},
            context_inputs=tuple(d["context_inputs"]),
            uses_size_conditions=bool(d["uses_size_conditions"]),
            num_classes=int(d.get("num_classes", 0)),
            id2label=_frozen(d.get("id2label", {})),
            state=tuple(d.get("state", ("hidden",))),
            state_init=_frozen(d.get("state_init", {})),
            token_layout=d.get("token_layout", "patch"),
            guidance=d.get("guidance", "cfg"),
            position_ids=bool(d.get("position_ids", False)),
        )


_MODEL_INTS = (
    "num_blocks",
    "latent_channels",
    "out_channels",
    "patch_size",
    "sample_size",
    "vae_scale_factor",
    "default_image_size",
)


@dataclass(frozen=True)
class TokenizerSpec:
    file: str  # a `tokenizers` tokenizer.json
    max_length: int  # tokens the text encoder reads; longer prompts are refused (runtime.request)
    pad_id: int
    openvino: str | None = None  # the same tokenizer converted by openvino-tokenizers (the C++ runtime's)
    input: str = "input_ids"  # the text_encoder input its ids feed (schema 4 `tokenizers`)
    # Schema 5 (Sana): a prompt is `instruction` + the prompt, padded and truncated to
    # `instruction_max_length`; a negative prompt is itself, to `max_length`.
    instruction: str | None = None
    instruction_max_length: int | None = None

    def text_and_length(self, prompt: str, negative: bool = False) -> tuple[str, int]:
        """What this tokenizer encodes for `prompt` (lower-cased and stripped, as the PixArt and Sana
        pipelines preprocess) and the length it pads and truncates to."""
        text = prompt.lower().strip()
        if self.instruction is None or negative:
            return text, self.max_length
        assert self.instruction_max_length is not None  # the schema requires both
        return self.instruction + text, self.instruction_max_length


@dataclass(frozen=True)
class CalibrationSpec:
    """Recorded feeds of one plan's trajectories (calibrate): a .npz per segment."""

    plan: str
    requests: int
    guidance_scale: float
    max_samples: int
    files: Mapping[str, str]  # segment -> .npz file
    method: str | None = None  # a variant's: how its ranges were calibrated from these samples
    raw: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({})
    )  # as written, for a variant's provenance record

    @classmethod
    def parse(cls, d: Mapping[str, Any] | None) -> CalibrationSpec | None:
        if d is None:
            return None
        return cls(
            d["plan"],
            int(d["requests"]),
            float(d["guidance_scale"]),
            int(d["max_samples"]),
            _frozen({name: entry["file"] for name, entry in d["segments"].items()}),
            d.get("method"),
            _frozen(d),
        )


@dataclass(frozen=True)
class VariantSpec:
    """A precision variant (quantize): the segments it replaces, and the engines that run it."""

    name: str
    mode: str
    segments: Mapping[str, SegmentSpec]
    quantized_layers: Mapping[str, int]
    calibration: CalibrationSpec | None
    ort_session_config: Mapping[str, str]
    # mode bf16: how its segments were chosen (`plan` checked on, `f32`: segment -> why it stays f32)
    precision_policy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def engines(self) -> tuple[str, ...]:
        return VARIANT_ENGINES[self.mode]

    @property
    def engine(self) -> str:
        """The engine a command opens this variant on when the user names none."""
        return self.engines[0]

    @classmethod
    def parse(cls, name: str, d: Mapping[str, Any]) -> VariantSpec:
        return cls(
            name,
            d["mode"],
            _frozen({s: SegmentSpec.parse(s, spec) for s, spec in d["segments"].items()}),
            _frozen(d["quantized_layers"]),
            CalibrationSpec.parse(d["calibration"]),
            _frozen(d.get("ort_session_config", {})),
            _frozen(d.get("precision_policy", {})),
        )


@dataclass(frozen=True)
class EngineSetSpec:
    """TensorRT engines built for one key ("base" or a variant): where, with what, for what."""

    key: str
    tensorrt: str
    gpu: str
    compute_capability: str
    segments: Mapping[str, Mapping[str, Any]]  # segment -> {file, onnx, profile, build_s}
    record: Mapping[str, Any]  # everything the build recorded (options, workspace, timing cache)

    @classmethod
    def parse(cls, key: str, d: Mapping[str, Any]) -> EngineSetSpec:
        return cls(
            key,
            d["tensorrt"],
            d["gpu"],
            d["compute_capability"],
            _frozen({s: _frozen(e) for s, e in d["segments"].items()}),
            _frozen(d),
        )


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.json, validated (schema `manifest`, a version of `SCHEMA_VERSIONS`)."""

    architecture: str
    config_hash: str
    model: ModelSpec
    loop: tuple[int, int] | None  # the ILF inner loop b..e, None without a feedback module
    precision: str  # of the exported backbone: fp32 or fp16
    max_batch: int
    resolutions: tuple[tuple[int, int], ...]  # (height, width) in pixels; the first is the default
    latent_sizes: tuple[tuple[int, int], ...]
    cut_points: tuple[int, ...]
    segments: Mapping[str, SegmentSpec]
    plans: Mapping[str, str]  # name -> plans/NAME.json
    tokenizer: TokenizerSpec | None  # None: a class-conditional model (DiT), or several (`tokenizers`)
    scheduler: Mapping[str, Any]  # the source pipeline's diffusers scheduler config
    torch_model: str | None  # the source pipeline's directory inside the bundle
    tools: Mapping[str, str]
    files: Mapping[str, str]  # every file a reader may open -> sha256
    calibration: CalibrationSpec | None
    variants: Mapping[str, VariantSpec]
    engines: Mapping[str, EngineSetSpec]
    tokenizers: tuple[TokenizerSpec, ...] = ()  # schema 4: SD3's CLIP-L, CLIP-G, T5; Flux's CLIP, T5

    @classmethod
    def parse(cls, d: Any, where: str = "manifest.json") -> Manifest:
        """Validate `d` (the parsed JSON) and build the typed manifest; one-line errors."""
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version not in SCHEMA_VERSIONS:
            raise BundleError(
                f"{where}: bundle schema version {version!r} is not supported (this tool reads "
                f"{' and '.join(map(str, SCHEMA_VERSIONS))}); rebuild the bundle with this version of "
                "ilf-deploy"
            )
        found = problem("manifest", d)
        if found:
            raise BundleError(f"{where} does not follow the manifest schema {found}")
        loop = d["feedback"]["loop"] if d["feedback"] else None
        tokenizer = d["tokenizer"]
        manifest = cls(
            architecture=d["architecture"],
            config_hash=d["config_hash"],
            model=ModelSpec.parse(d["model"]),
            loop=None if loop is None else (int(loop[0]), int(loop[1])),
            precision=d["precision"],
            max_batch=int(d["max_batch"]),
            resolutions=tuple((int(h), int(w)) for h, w in d["resolutions"]),
            latent_sizes=tuple((int(h), int(w)) for h, w in d["latent_sizes"]),
            cut_points=tuple(int(c) for c in d["cut_points"]),
            segments=_frozen({n: SegmentSpec.parse(n, s) for n, s in d["segments"].items()}),
            plans=_frozen(d["plans"]),
            tokenizer=None if tokenizer is None else TokenizerSpec(**tokenizer),
            scheduler=_frozen({k: _non_finite(v) for k, v in d["scheduler"].items()}),
            torch_model=d["torch_model"],
            tools=_frozen(d["tools"]),
            files=_frozen(d["files"]),
            calibration=CalibrationSpec.parse(d.get("calibration")),
            variants=_frozen({n: VariantSpec.parse(n, v) for n, v in d.get("variants", {}).items()}),
            engines=_frozen({k: EngineSetSpec.parse(k, e) for k, e in d.get("engines", {}).items()}),
            tokenizers=tuple(TokenizerSpec(**t) for t in d.get("tokenizers", ())),
        )
        manifest._check_references(where)
        return manifest

    def _check_references(self, where: str) -> None:
        """What the schema cannot say: every file a field names is hashed; the model is consistent."""
        named = [s.file for s in self.segments.values()] + list(self.plans.values())
        named += [s.file for v in self.variants.values() for s in v.segments.values()]
        named += [e["file"] for es in self.engines.values() for e in es.segments.values()]
        for tokenizer in (self.tokenizer, *self.tokenizers):
            if tokenizer is not None:
                named += [f for f in (tokenizer.file, tokenizer.openvino) if f is not None]
        if self.calibration is not None:  # a variant's record is provenance: its files may be gone
            named += list(self.calibration.files.values())
        unlisted = sorted({f for f in named if f not in self.files})
        if unlisted:
            raise BundleError(f"{where} names {unlisted[0]} but does not list its sha256 in `files`")
        for name in ("text_encoder", "vae_decoder", "embed", "context", "time", "final"):
            textless = self.tokenizer is None and not self.tokenizers
            if name not in self.segments and not (name == "text_encoder" and textless):
                raise BundleError(f"{where} has no {name!r} segment")
        blocks = self.model.num_blocks
        for spec in self.segments.values():
            if spec.blocks is not None and not 0 <= spec.blocks[0] <= spec.blocks[1] < blocks:
                raise BundleError(
                    f"{where}: segment {spec.name} covers blocks {spec.blocks[0]}..{spec.blocks[1]}, "
                    f"outside the model's 0..{blocks - 1}"
                )
        for variant in self.variants.values():
            unknown = sorted(set(variant.segments) - set(self.segments))
            if unknown:
                raise BundleError(f"{where}: variant {variant.name} replaces unknown segment {unknown[0]}")

    # -- facts the readers ask for ---------------------------------------------------------------
    @property
    def default_size(self) -> tuple[int, int]:
        return self.resolutions[0]

    @property
    def reduced_precision_segments(self) -> tuple[str, ...]:
        """The segments an engine's bf16 applies to (OpenVINO's hint, the bf16 policy): the
        quantizable ones and the caption K/V projections (`cross_kv`), where nearly all FLOPs are.
        The rest (text encoder, timestep and conditioning, embedding, final layer, VAE) stays f32."""
        return (*self.quantizable_segments, *(n for n in self.segments if n == CROSS_KV_SEGMENT))

    @property
    def quantizable_segments(self) -> tuple[str, ...]:
        """The segments a quantized variant (int8, fp8) replaces: the blocks and the feedback block.
        Not `cross_kv`: it runs once per image, so int8 would buy nothing there, and its raw K/V
        fall below the int8 segment budget (24.5 dB against 30 on the tiny PixArt) where the blocks
        that read them, as a whole, do not."""
        return tuple(n for n, s in self.segments.items() if s.blocks or n == "feedback")

    @property
    def block_segments(self) -> tuple[SegmentSpec, ...]:
        """The block segments in order of the blocks they cover."""
        return tuple(sorted((s for s in self.segments.values() if s.blocks), key=lambda s: s.blocks or ()))

    def variant(self, name: str) -> VariantSpec:
        if name not in self.variants:
            raise BundleError(
                f"the bundle has no variant {name!r} (it has: {', '.join(self.variants) or 'none'})"
            )
        return self.variants[name]

    def segment(self, name: str, variant: str | None = None) -> SegmentSpec:
        """A segment's spec; a variant's replacement where it has one."""
        if variant is not None:
            replaced = self.variant(variant).segments.get(name)
            if replaced is not None:
                return replaced
        if name not in self.segments:
            raise BundleError(f"the bundle has no {name!r} segment")
        return self.segments[name]

    def precision_of(self, variant: str | None) -> str:
        """The precision a run of `variant` (None: the bundle itself) is judged at: fp32, int8-qdq…"""
        return self.precision if variant is None else self.variant(variant).mode
