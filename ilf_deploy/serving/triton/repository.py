"""`export-triton`: a bundle as a Triton Inference Server model repository.

Layout "python" (the default): `REPO/NAME/config.pbtxt` and `REPO/NAME/1/model.py`, a Python-backend
model that opens the bundle through our runtime (any registered backend) and runs the plan loop.
Layout "bls" adds one Triton model per bundle segment (`onnxruntime_onnx`, or `tensorrt_plan` for
engines from `build-engines`) and makes NAME call them through BLS, so the engines run in Triton's
own backends (NVIDIA's containers have them; the nvidia-pytriton wheel does not).

The configs are written as protobuf text; tests parse every one into Triton's `ModelConfig`.
"""

from __future__ import annotations

import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_deploy.core.batching import DEFAULT_BATCHING, MAX_WAIT_MS, BatchingPolicy
from ilf_deploy.core.errors import ConfigError, check_at_least
from ilf_deploy.core.files import staged_directory
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.manifest import SegmentSpec, TensorSpec

LAYOUTS = ("python", "bls")
KINDS = ("cpu", "gpu")
WARMUP_PROMPT_FILE = "prompt"  # in NAME/warmup/, where Triton looks for model_warmup's input files
BUNDLE_DIR = "bundle"  # --copy-bundle: the bundle's place inside the version directory
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
}


@dataclass(frozen=True)
class ExportOptions:
    name: str = "ilf"
    backend: str = "onnxruntime"  # a registry name (ilf_deploy.engines.backends); layout "python" only
    variant: str | None = None
    instances: int = 1
    kind: str = "cpu"
    # Triton's dynamic batcher, as `serve` batches (core/batching.py; `policy` below):
    max_batch: int | None = None  # Triton's max_batch_size; None: the bundle's, at least 8
    max_queue_delay_us: int = DEFAULT_BATCHING.max_queue_delay_us  # serve's --max-wait-ms, in µs
    max_queue: int = DEFAULT_BATCHING.max_queue
    default_plan: str | None = None  # None: the bundle's first ILF plan
    copy_bundle: bool = False
    layout: str = "python"
    warmup: bool = True
    force: bool = False
    digest: str | None = None  # --digest: export only this bundle (the model always pins the one exported)

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"--name {self.name!r}: use letters, digits, '_', '.' and '-'")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        check_at_least("--instances", self.instances)
        most_us = round(MAX_WAIT_MS * 1000)
        if not 0 <= self.max_queue_delay_us <= most_us:  # the policy's --max-wait-ms bound, in µs
            raise ConfigError(f"--max-queue-delay-us must be in 0..{most_us}, got {self.max_queue_delay_us}")
        self.policy.check_batching()
        if self.layout == "bls" and self.backend not in ("onnxruntime", "tensorrt"):
            raise ConfigError("--layout bls runs segments in Triton's onnxruntime or tensorrt backend")

    @classmethod
    def serving(cls, policy: BatchingPolicy, **options: Any) -> ExportOptions:
        """A repository that batches as `policy` says (`serve --server triton`)."""
        return cls(
            max_batch=policy.max_batch,
            max_queue_delay_us=policy.max_queue_delay_us,
            max_queue=policy.max_queue,
            **options,
        )

    @property
    def policy(self) -> BatchingPolicy:
        """The batching policy this repository's config carries. Triton has no `n` (a request's
        rows are bounded by max_batch_size) and no per-request deadline of ours: those stay 1 and
        the default."""
        return BatchingPolicy(self.max_batch, self.max_queue_delay_us / 1000, self.max_queue, max_n=1)

    def batch_limit(self, bundle: Bundle) -> int:
        # ORT segments have dynamic batch axes; TensorRT engines are built for a batch range.
        return self.policy.images_per_call(bundle.manifest.max_batch, self.backend == "tensorrt")


def segment_model_name(model: str, segment: str) -> str:
    """The Triton model of one segment in the BLS layout."""
    return f"{model}_{segment}"


# -- protobuf text -------------------------------------------------------------------------------
def quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f"  {{ name: {quote(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ]{extra} }}"


def _tensors(field: str, tensors: list[str]) -> str:
    return f"{field} [\n" + ",\n".join(tensors) + "\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(
        f"parameters {{ key: {quote(k)} value {{ string_value: {quote(v)} }} }}\n" for k, v in values.items()
    )


def _instances(options: ExportOptions) -> str:
    return f"instance_group [ {{ count: {options.instances} kind: KIND_{options.kind.upper()} }} ]\n"


def model_inputs(architecture: str) -> list[tuple[str, str, bool]]:
    """(name, Triton type, optional) of the generation model's inputs; each is one value per row."""
    prompt = (
        [("class_label", "TYPE_INT64", False)]
        if architecture == "dit"
        else [("prompt", "TYPE_STRING", False), ("negative_prompt", "TYPE_STRING", True)]
    )
    return [
        *prompt,
        ("seed", "TYPE_INT64", True),
        ("plan", "TYPE_STRING", True),
        ("guidance_scale", "TYPE_FP32", True),
        ("height", "TYPE_INT32", True),
        ("width", "TYPE_INT32", True),
    ]


def generation_config(bundle: Bundle, options: ExportOptions, parameters: dict[str, str]) -> str:
    batch = options.batch_limit(bundle)
    inputs = [_tensor(n, t, [1], optional) for n, t, optional in model_inputs(bundle.architecture)]
    text = (
        f"name: {quote(options.name)}\n"
        'backend: "python"\n'
        f"max_batch_size: {batch}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        + _tensors("input", inputs)
        + _tensors("output", [_tensor("image", "TYPE_UINT8", [-1, -1, 3])])
        + _instances(options)
        + "dynamic_batching {\n"
        f"  preferred_batch_size: [ {batch} ]\n"
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
        # a full queue answers at once ("Exceeds maximum queue size"), it does not hang
        f"  default_queue_policy {{ timeout_action: REJECT max_queue_size: {options.max_queue} }}\n"
        "}\n" + _parameters(parameters)
    )
    if options.warmup:  # one guided image at the default size before Triton calls the model ready
        first = (
            '    inputs { key: "class_label" value { data_type: TYPE_INT64 dims: [ 1 ] zero_data: true } }\n'
            if bundle.architecture == "dit"
            else f'    inputs {{ key: "prompt" value {{ data_type: TYPE_STRING dims: [ 1 ] '
            f"input_data_file: {quote(WARMUP_PROMPT_FILE)} }} }}\n"
        )
        text += (
            'model_warmup [\n  {\n    name: "one image"\n    batch_size: 1\n'
            + first
            + '    inputs { key: "seed" value { data_type: TYPE_INT64 dims: [ 1 ] zero_data: true } }\n'
            "  }\n]\n"
        )
    return text


def segment_config(name: str, spec: SegmentSpec, platform: str, options: ExportOptions) -> str:
    def tensor(io: TensorSpec) -> str:
        dims = [d if isinstance(d, int) else -1 for d in io.shape]
        if io.dtype not in _TYPES:
            raise ConfigError(f"segment {name}: no Triton type for {io.dtype}")
        return _tensor(io.name, _TYPES[io.dtype], dims)

    return (
        f"name: {quote(name)}\n"
        f"platform: {quote(platform)}\n"
        "max_batch_size: 0\n"  # the batch axis is the segments' own first dimension
        + _tensors("input", [tensor(i) for i in spec.inputs])
        + _tensors("output", [tensor(o) for o in spec.outputs])
        + _instances(options)
    )


MODEL_PY = '''"""Triton Python-backend model written by `ilf-deploy export-triton` (layout {layout}).

The logic is in the installed ilf-deploy package (ilf_deploy/serving/triton/model.py): this file only
names it, so a repository and the runtime that opens its bundle cannot drift apart.
"""

from ilf_deploy.serving.triton.model import {cls} as TritonPythonModel  # noqa: F401
'''


# -- export ------------------------------------------------------------------------------------
def export_repository(bundle_path: str | Path, out: str | Path, options: ExportOptions) -> list[Path]:
    """Write the model(s) into the repository `out`; returns their directories."""
    from ilf_deploy.engines.backends import AUTO, get_backend
    from ilf_deploy.engines.backends.plans import PlanBook

    options.check()
    bundle = Bundle.load(bundle_path, digest=options.digest)  # an edited or other bundle: one line
    if options.backend != AUTO:
        get_backend(options.backend)  # an unknown backend is a one-line error listing the known ones
    if options.variant is not None:
        bundle.segment_spec("embed", options.variant)
    # every plan read as the model reads them, and the default: any spec the model resolves, else one line
    PlanBook(bundle, options.default_plan)
    repo = Path(out)
    models: dict[str, Any] = {options.name: None}
    if options.layout == "bls":
        models.update(_segment_sources(bundle, options))
    existing = [name for name in models if (repo / name).exists()]
    if existing and not options.force:
        raise ConfigError(f"{repo} already has model(s) {', '.join(existing)}; pass --force to replace them")
    repo.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in models.items():
        # staged under a hidden name (Triton passes it by), renamed into place when complete
        with staged_directory(repo / name, replace=options.force) as staged:
            if source is None:
                _write_generation_model(bundle, staged, options)
            else:
                _write_segment_model(staged, name, *source, options)
        written.append(repo / name)
    return written


def _write_generation_model(bundle: Bundle, directory: Path, options: ExportOptions) -> None:
    version = directory / "1"
    version.mkdir(parents=True)
    if options.copy_bundle:
        shutil.copytree(bundle.path, version / BUNDLE_DIR)
        location = BUNDLE_DIR  # relative: resolved against the version directory at load time
    else:
        location = str(bundle.path.resolve())
    # The model opens only the bundle exported here: a rebuilt or edited one is refused at load.
    parameters = {"bundle": location, "layout": options.layout, "digest": bundle.digest}
    if options.layout == "python":
        parameters["backend"] = options.backend
    if options.variant:
        parameters["variant"] = options.variant
    if options.default_plan:
        parameters["default_plan"] = options.default_plan
    (directory / "config.pbtxt").write_text(generation_config(bundle, options, parameters))
    cls = "BlsPythonModel" if options.layout == "bls" else "IlfPythonModel"
    (version / "model.py").write_text(MODEL_PY.format(layout=options.layout, cls=cls))
    if options.warmup and bundle.architecture != "dit":
        (directory / "warmup").mkdir()
        prompt = b"warm up"  # Triton's file format for a BYTES element: a 4-byte length, then the bytes
        (directory / "warmup" / WARMUP_PROMPT_FILE).write_bytes(struct.pack("<I", len(prompt)) + prompt)


def _segment_sources(bundle: Bundle, options: ExportOptions) -> dict[str, tuple[SegmentSpec, Path, str]]:
    """Segment model name -> (I/O spec, file, platform) for the BLS layout."""
    sources = {}
    engines: dict[str, Any] = {}
    if options.backend == "tensorrt":
        from ilf_deploy.engines.backends.tensorrt import engine_set

        engines = engine_set(bundle.manifest, options.variant).segments
    for segment in bundle.manifest.segments:
        spec = bundle.segment_spec(segment, options.variant)
        if options.backend == "tensorrt":
            if segment not in engines:
                raise ConfigError(f"the bundle has no TensorRT engine for segment {segment}")
            source = (spec, bundle.path / engines[segment]["file"], "tensorrt_plan")
        else:
            source = (spec, bundle.path / spec.file, "onnxruntime_onnx")
        sources[segment_model_name(options.name, segment)] = source
    return sources


def _write_segment_model(
    directory: Path, name: str, spec: dict[str, Any], file: Path, platform: str, options: ExportOptions
) -> None:
    version = directory / "1"
    version.mkdir(parents=True)
    target = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
    shutil.copy2(file, version / target)
    data = file.with_name(file.name + ".data")  # ONNX external data keeps its name (the graph says it)
    if data.is_file():
        shutil.copy2(data, version / data.name)
    (directory / "config.pbtxt").write_text(segment_config(name, spec, platform, options))
