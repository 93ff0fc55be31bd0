"""The Triton Python-backend models that `export-triton` writes (their model.py imports these).

`Engine` is the part that knows nothing of Triton: rows of tensors in, images or one-line errors
out. Triton's dynamic batcher hands `execute` several requests (each with one or more rows); the
rows are grouped by (plan, height, width, guided), as `serve`'s batcher groups them, and each group
is one `Generator.generate_batch` + one `decode`. A bad row fails its request only; the model stays up.

`IlfPythonModel` opens the bundle on any registered backend (`ilf_deploy.backends.open_generator`).
`BlsPythonModel` runs the same `BundleGenerator` and `runtime/loop.py` on a `SegmentRunner` whose
segment calls are BLS requests to the per-segment models of the "bls" layout.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ConfigError, IlfError
from ..runtime.bundle import Bundle, BundleError
from ..runtime.generator import Generator, Request, default_guidance
from ..runtime.pipeline import BundleGenerator
from ..runtime.prompts import PromptLimit
from ..runtime.runner import SegmentRunner

MAX_GUIDANCE = 30.0  # as the HTTP API (serve/schema.py)
MAX_SEED = 2**63 - 1


class RowError(IlfError):
    """A request's row that cannot be generated: answered as that request's error."""


class Key(NamedTuple):
    plan: str
    height: int
    width: int
    guided: bool


@dataclass
class Row:
    request: int  # index of the Triton request in the batch
    key: Key
    value: Request


def _scalar_rows(inputs: dict[str, np.ndarray | None], name: str, rows: int) -> list[Any] | None:
    array = inputs.get(name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.shape[0] != rows:
        raise RowError(f"{name} has {flat.shape[0]} values for {rows} rows; send one per row (shape [n, 1])")
    return list(flat)


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(f"{name} is not UTF-8 text") from None
    return str(value)


class Engine:
    """A generator and its bundle's plans, behind Triton's request rows."""

    def __init__(self, generator: Generator, bundle: Bundle, default_plan: str | None = None) -> None:
        self.generator, self.bundle = generator, bundle
        self.plans = {name: bundle.plan(name) for name in bundle.plan_names}
        if default_plan is not None and default_plan not in self.plans:
            raise ConfigError(f"default plan {default_plan!r} is not in the bundle")
        self.default_plan = default_plan or bundle.default_plan
        self.is_dit = bundle.architecture == "dit"
        self.default_guidance = default_guidance(bundle.architecture)
        self.height, self.width = bundle.manifest.default_size
        self.prompts = PromptLimit(bundle)

    def open_segments(self) -> None:
        """Every segment's session opened now, not by the first request of a plan that uses it
        (Triton's model_warmup, in the config, then runs one image through `execute`)."""
        session = getattr(self.generator.segments, "session", None)  # ONNX Runtime: lazily opened
        if session is not None:
            for name in self.bundle.manifest.segments:
                session(name)

    # -- one request's rows ------------------------------------------------------------------------
    def check_text(self, text: str, name: str) -> None:
        try:
            self.prompts.check(text, name)
        except ConfigError as exc:
            raise RowError(str(exc)) from None

    def rows(self, index: int, inputs: dict[str, np.ndarray | None]) -> list[Row]:
        """A request's inputs -> one Row per batch row, every value checked."""
        first = inputs.get("class_label" if self.is_dit else "prompt")
        if first is None:
            raise RowError("class_label is required" if self.is_dit else "prompt is required")
        count = int(np.asarray(first).reshape(-1).shape[0])
        if count == 0:
            raise RowError("the request has no rows")
        column = {name: _scalar_rows(inputs, name, count) for name in inputs}
        rows = []
        for i in range(count):

            def get(name: str, default: Any = None, i: int = i) -> Any:
                values = column.get(name)
                return default if values is None else values[i]

            plan = _text(get("plan", self.default_plan), "plan") or self.default_plan
            if plan not in self.plans:
                raise RowError(f"unknown plan {plan!r}; this bundle has: {', '.join(self.plans)}")
            guidance = float(get("guidance_scale", self.default_guidance))
            if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
                raise RowError(f"guidance_scale must be in 0..{MAX_GUIDANCE:g}, got {guidance}")
            seed = get("seed")
            seed = secrets.randbelow(2**32) if seed is None else int(seed)
            if not 0 <= seed <= MAX_SEED:
                raise RowError(f"seed must be >= 0, got {seed}")
            request = Request(guidance_scale=guidance, seed=seed)
            if self.is_dit:
                request.class_label = int(get("class_label"))
                if not 0 <= request.class_label < self.generator.facts.num_classes:
                    raise RowError(
                        f"class_label must be in 0..{self.generator.facts.num_classes - 1}, "
                        f"got {request.class_label}"
                    )
            else:
                request.prompt = _text(get("prompt"), "prompt")
                request.negative_prompt = _text(get("negative_prompt", b""), "negative_prompt")
                if not request.prompt.strip():
                    raise RowError("prompt must not be empty")
                self.check_text(request.prompt, "prompt")
                self.check_text(request.negative_prompt, "negative_prompt")
            request.height = int(get("height", self.height)) or self.height
            request.width = int(get("width", self.width)) or self.width
            try:
                self.generator.latent_size(request)  # a size the bundle was not built for
            except ConfigError as exc:
                raise RowError(str(exc)) from None
            key = Key(plan, request.height, request.width, guidance > 1.0)
            rows.append(Row(index, key, request))
        return rows

    # -- a Triton batch ----------------------------------------------------------------------------
    def run(self, batch: list[dict[str, np.ndarray | None]]) -> list[np.ndarray | Exception]:
        """Each request's images (rows, H, W, 3) uint8, or the exception that failed it."""
        results: list[np.ndarray | Exception | None] = [None] * len(batch)
        groups: dict[Key, list[Row]] = defaultdict(list)
        for index, inputs in enumerate(batch):
            try:
                rows = self.rows(index, inputs)
                if len({(r.key.height, r.key.width) for r in rows}) > 1:
                    raise RowError("a request's rows must share one image size (one output tensor)")
            except (IlfError, ValueError, TypeError) as exc:
                results[index] = exc if isinstance(exc, IlfError) else RowError(str(exc))
                continue
            for row in rows:
                groups[row.key].append(row)
        images: dict[tuple[int, int], np.ndarray] = {}  # (request, row number) -> image
        counters: dict[int, int] = defaultdict(int)
        positions = {}
        for rows in groups.values():
            for row in rows:
                positions[id(row)] = counters[row.request]
                counters[row.request] += 1
        for key, rows in groups.items():
            live = [r for r in rows if results[r.request] is None]
            if not live:
                continue
            try:
                latents = self.generator.generate_batch(self.plans[key.plan], [r.value for r in live])
                decoded = self.generator.decode(latents)
            except Exception as exc:  # an engine failure fails this group's requests, not the model
                for row in live:
                    results[row.request] = RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
                continue
            for row, image in zip(live, decoded):
                images[(row.request, positions[id(row)])] = image
        out: list[np.ndarray | Exception] = []
        for index, result in enumerate(results):
            if result is None:
                result = np.stack([images[(index, i)] for i in range(counters[index])])
            out.append(result)
        return out


# -- Triton's side -------------------------------------------------------------------------------
def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _bundle_path(location: str, args: dict[str, str]) -> Path:
    path = Path(location)
    if not path.is_absolute():  # --copy-bundle: inside the version directory
        path = Path(args["model_repository"]) / args["model_version"] / path
    return path


class _PythonModel:
    """What both layouts share: config, inputs and responses. Subclasses open the generator."""

    engine: Engine

    def open_generator(self, bundle: Bundle, params: dict[str, str], args: dict[str, str]) -> Generator:
        raise NotImplementedError

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.input_names = [i["name"] for i in config["input"]]
        try:
            if not params.get("bundle"):
                raise ConfigError("the model config has no 'bundle' parameter")
            # hashes checked, and the digest the repository was exported with
            bundle = Bundle.load(_bundle_path(params["bundle"], args), digest=params.get("digest") or None)
            generator = self.open_generator(bundle, params, args)
            self.engine = Engine(generator, bundle, params.get("default_plan") or None)
            self.engine.open_segments()
        except IlfError as exc:
            # One line in Triton's log; the exception makes the load fail and the model not ready.
            pb_utils.Logger.log_error(f"ilf-deploy: {args.get('model_name', '')}: {exc}")
            raise pb_utils.TritonModelException(str(exc)) from None

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        inputs = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            inputs[name] = None if tensor is None else tensor.as_numpy()
        return inputs

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        results = self.engine.run([self._inputs(r) for r in requests])
        responses = []
        for result in results:
            if isinstance(result, Exception):
                message = str(result).splitlines()[0] if str(result) else type(result).__name__
                # a bad request is the client's (HTTP 400); an engine failure is ours (500)
                code = pb.TritonError.INVALID_ARG if isinstance(result, IlfError) else pb.TritonError.INTERNAL
                error = pb.TritonError(message, code)
                responses.append(pb.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("image", result)]))
        return responses

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]


class IlfPythonModel(_PythonModel):
    """Layout "python": the bundle runs inside this model on a registered backend."""

    def open_generator(self, bundle: Bundle, params: dict[str, str], args: dict[str, str]) -> Generator:
        from ..backends import AUTO, get_backend, open_bundle_generator

        name = params.get("backend") or "onnxruntime"
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and name != AUTO and "*" in get_backend(name).devices:
            device = f"cuda:{args.get('model_instance_device_id', '0')}"  # KIND_GPU: this instance's GPU
        return open_bundle_generator(bundle, name, params.get("variant") or None, device)


class BlsRunner(SegmentRunner):
    """Segments run as BLS requests to the segment models Triton serves (layout "bls")."""

    backend = "triton-bls"

    def __init__(self, bundle: Bundle, variant: str | None, pb_utils: Any, model_name: str) -> None:
        super().__init__(bundle, variant)
        self.pb, self.model_name = pb_utils, model_name
        self._io: dict[str, tuple[list[tuple[str, np.dtype]], list[str]]] = {}

    def io(self, name: str) -> tuple[list[tuple[str, np.dtype]], list[str]]:
        if name not in self._io:
            spec = self.bundle.segment_spec(name, self.variant)
            inputs = [(i.name, np.dtype(i.dtype)) for i in spec.inputs]
            self._io[name] = (inputs, list(spec.output_names))
        return self._io[name]

    def infer_impl(self, name: str, feeds: dict[str, Any]) -> dict[str, Any]:
        from .repository import segment_model_name

        pb = self.pb
        inputs, outputs = self.io(name)
        tensors = [pb.Tensor(n, np.ascontiguousarray(feeds[n], dtype=dtype)) for n, dtype in inputs]
        request = pb.InferenceRequest(
            model_name=segment_model_name(self.model_name, name),
            requested_output_names=outputs,
            inputs=tensors,
        )
        response = request.exec()
        if response.has_error():
            raise BundleError(f"segment {name}: {response.error().message()}")
        return {o: pb.get_output_tensor_by_name(response, o).as_numpy() for o in outputs}

    def array(self, value: Any) -> Any:
        return np.asarray(value)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)


class BlsPythonModel(_PythonModel):
    """Layout "bls": the same generator and loop; every segment is a Triton model of its own."""

    def open_generator(self, bundle: Bundle, params: dict[str, str], args: dict[str, str]) -> Generator:
        runner = BlsRunner(bundle, params.get("variant") or None, self.pb, args["model_name"])
        return BundleGenerator(bundle, runner)
