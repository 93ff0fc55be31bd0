"""The Triton Python-backend models that `export-triton` writes (their model.py imports these).

`Engine` is the part that knows nothing of Triton: rows of tensors in, images or one-line errors
out. Triton's dynamic batcher hands `execute` several requests (each with one or more rows); the
rows are grouped by (plan, height, width, guided), as `serve`'s batcher groups them, and each group
is cut into engine calls of `serve`'s batch buckets (1, 2, 4, ..., max_batch_size: core/batching.py),
each one `Generator.generate_batch` + one `decode`. With a `model_warmup` in the config, `initialize`
first runs one batch of each bucket, as `serve`'s warm-up, so an engine that compiles per input shape
(OpenVINO: one static shape set a segment per bucket, `Segments.keep_static_shapes`) has them all
compiled before the model is ready; a warm-up that fails fails the load. (Not one `model_warmup`
sample per bucket: tritonserver 2.51 died of signal 11 after such a warm-up's sample failed.) A bad
row fails its request only; the model stays up.

Every request gets its own response (its images, a 400 for a refusal, a 500 for an engine failure:
non-finite latents among them), counted per request in our own `ilf_*` metrics, which Triton
exports on its metrics port beside its `nv_*` ones (`TritonMetrics`); refusals are logged as
warnings, at most one line per `throttle.LOG_INTERVAL_S` (`Throttled`).

`IlfPythonModel` opens the bundle on any registered backend (`ilf_deploy.engines.backends.open_generator`).
`BlsPythonModel` runs the same `BundleGenerator` and `core/runtime/loop.py` on a `SegmentRunner` whose
segment calls are BLS requests to the per-segment models of the "bls" layout.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ilf_deploy.core.batching import MIN_MAX_BATCH, batch_buckets, bucket_chunks
from ilf_deploy.core.errors import ConfigError, IlfError, NonFiniteError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.generator import Generator, Request, warm_up
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.core.runtime.request import RequestContract, Size
from ilf_deploy.core.runtime.runner import SegmentRunner
from ilf_deploy.core.throttle import Throttled
from ilf_deploy.engines.backends.plans import PlanBook


class RowError(IlfError):
    """A request's row that cannot be generated: answered as that request's error."""


class EngineFailure(RuntimeError):
    """A group's generation failed in the engine (HTTP 500); `reason` labels it in the metrics."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(f"generation failed: {type(exc).__name__}: {exc}")
        self.reason = "non_finite" if isinstance(exc, NonFiniteError) else "error"


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


def _scalar_rows(array: np.ndarray, name: str, rows: int) -> list[Any]:
    flat = np.asarray(array).reshape(-1)
    if flat.shape[0] != rows:
        raise RowError(f"{name} has {flat.shape[0]} values for {rows} rows; send one per row (shape [n, 1])")
    return list(flat)


class Engine:
    """A generator and its bundle's plans, behind Triton's request rows."""

    def __init__(
        self, generator: Generator, default_plan: str | None = None, max_batch: int = MIN_MAX_BATCH
    ) -> None:
        self.generator = generator
        self.buckets = batch_buckets(max(max_batch, 1))  # the engine calls' sizes (Triton: max_batch_size)
        bundle = generator.opened_bundle()  # the one the model loaded (its digest pinned), not reread
        # the one plan resolver (serve's too): the bundle's plans, the default (any form), presets
        self.plans = PlanBook(bundle, default_plan, "default_plan")
        # every row is checked by the request contract that `serve` and `generate` use
        self.contract = RequestContract.for_bundle(
            bundle, generator, default_plan=self.plans.default, check_plan=self.plans.check
        )

    def open_segments(self, warm: bool = False) -> None:
        """Every segment opened now, not by the first request of a plan that uses it; `warm` (the
        config has a model_warmup, which then runs one image through `execute`): first one batch of
        each bucket, as `serve`'s warm-up."""
        if warm:
            plan, request = self.contract.warmup_request()
            self.buckets = warm_up(self.generator, self.plans[plan], request, self.buckets)
        else:
            self.generator.segments.keep_static_shapes(len(self.buckets))
            self.generator.segments.open_all()  # e.g. ONNX Runtime: every session, lazily opened otherwise

    # -- one request's rows ------------------------------------------------------------------------
    def rows(self, index: int, inputs: dict[str, np.ndarray | None]) -> list[Row]:
        """A request's inputs -> one Row per batch row, every value checked by the contract."""
        present = {name: array for name, array in inputs.items() if array is not None}
        count = max((int(np.asarray(a).reshape(-1).shape[0]) for a in present.values()), default=1)
        if count == 0:
            raise RowError("the request has no rows")
        column = {name: _scalar_rows(array, name, count) for name, array in present.items()}
        rows = []
        for i in range(count):
            fields = {name: values[i] for name, values in column.items() if name not in ("height", "width")}
            if "height" in column or "width" in column:
                fields["size"] = Size(*(column[n][i] if n in column else None for n in ("height", "width")))
            checked = self.contract.check(fields)  # a RequestError (an IlfError) fails the request
            request = checked.requests[0]
            assert checked.plan is not None and request.height is not None and request.width is not None
            rows.append(Row(index, Key(checked.plan, request.height, request.width, checked.guided), request))
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
                # Without its traceback: that holds this frame, whose `inputs` (a 64 MB prompt, in
                # the stub's shared memory) a reference cycle would keep until the next gc run.
                refusal = exc if isinstance(exc, IlfError) else RowError(str(exc))
                results[index] = refusal.with_traceback(None)
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
        calls = [
            (key, list(chunk))
            for key, rows in groups.items()
            for chunk in bucket_chunks([r for r in rows if results[r.request] is None], self.buckets)
        ]
        for key, live in calls:
            try:
                latents = self.generator.generate_batch(self.plans[key.plan], [r.value for r in live])
                decoded = self.generator.decode(latents)
            except Exception as exc:  # an engine failure fails this group's requests, not the model
                for row in live:
                    results[row.request] = EngineFailure(exc)
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


class TritonMetrics:
    """Our per-request counters, on Triton's metrics port beside its own (`pb_utils.MetricFamily`).

    Triton 2.51 counts a Python model's requests per execution (`nv_inference_request_success`
    moves for every request the model answered, refusals included), so these say what happened to
    each request: `ilf_requests_total{model, outcome}` (success, refused: 400, failed: 500),
    `ilf_images_total{model}` (images delivered, co-batched with refusals or not) and
    `ilf_engine_errors_total{model, reason}` (non_finite, error: per failed request)."""

    def __init__(self, pb: Any, model: str) -> None:
        family = pb.MetricFamily
        self.model = model
        self.families = {
            "requests": family(
                "ilf_requests_total", "Requests by outcome (success, refused, failed).", family.COUNTER
            ),
            "images": family("ilf_images_total", "Images delivered.", family.COUNTER),
            "engine_errors": family(
                "ilf_engine_errors_total", "Failed requests by reason (non_finite, error).", family.COUNTER
            ),
        }
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = self.families[name].Metric(labels={"model": self.model, **labels})
        self._metrics[key].increment(amount)

    def count(self, results: list[np.ndarray | Exception]) -> None:
        for result in results:
            if isinstance(result, EngineFailure):
                self.inc("requests", outcome="failed")
                self.inc("engine_errors", reason=result.reason)
            elif isinstance(result, Exception):
                self.inc("requests", outcome="refused" if isinstance(result, IlfError) else "failed")
            else:
                self.inc("requests", outcome="success")
                self.inc("images", len(result))

    def close(self) -> None:
        self._metrics.clear()  # Triton wants each Metric gone before its MetricFamily
        self.families.clear()


class _TritonWarnings:
    """`Throttled`'s logger on Triton's log (`pb_utils.Logger.log_warn`)."""

    def __init__(self, pb: Any, model: str) -> None:
        self.pb, self.model = pb, model

    def warning(self, msg: str, *args: object, extra: dict | None = None) -> None:
        fields = (extra or {}).get("fields", {})
        count, interval = fields.get("count", 1), fields.get("interval_s", 0)
        text = msg % args if args else msg
        self.pb.Logger.log_warn(f"ilf-deploy: {self.model}: {text} ({count} in {interval:g} s)")


class _PythonModel:
    """What both layouts share: config, inputs and responses. Subclasses open the generator."""

    engine: Engine
    metrics: TritonMetrics
    warnings: Throttled

    def open_generator(self, bundle: Bundle, params: dict[str, str], args: dict[str, str]) -> Generator:
        raise NotImplementedError

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.input_names = [i["name"] for i in config["input"]]
        model = args.get("model_name", "")
        self.metrics = TritonMetrics(pb_utils, model)
        self.warnings = Throttled(_TritonWarnings(pb_utils, model))
        try:
            if not params.get("bundle"):
                raise ConfigError("the model config has no 'bundle' parameter")
            # hashes checked, and the digest the repository was exported with
            bundle = Bundle.load(_bundle_path(params["bundle"], args), digest=params.get("digest") or None)
            generator = self.open_generator(bundle, params, args)
            batch = config.get("max_batch_size") or 1  # 0: Triton batches nothing
            self.engine = Engine(generator, params.get("default_plan") or None, batch)
            self.engine.open_segments(warm=bool(config.get("model_warmup")))
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

    def _response(self, result: np.ndarray | Exception) -> Any:
        pb = self.pb
        if not isinstance(result, Exception):
            return pb.InferenceResponse(output_tensors=[pb.Tensor("image", result)])
        message = str(result).splitlines()[0] if str(result) else type(result).__name__
        # a bad request is the client's (HTTP 400); an engine failure is ours (500)
        code = pb.TritonError.INVALID_ARG if isinstance(result, IlfError) else pb.TritonError.INTERNAL
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request. Triton 2.51 counts them all as successes of this execution
        (a Python model cannot fail one request of it), so `TritonMetrics` counts each request."""
        results = self.engine.run([self._inputs(r) for r in requests])
        self.metrics.count(results)
        for result in results:
            if isinstance(result, EngineFailure):
                self.warnings.event("failed", f"request failed: {str(result)[:300]}")
            elif isinstance(result, Exception):
                reason = (str(result).splitlines() or [type(result).__name__])[0]
                self.warnings.event("refused", f"request refused: {reason[:300]}")
        return [self._response(result) for result in results]

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
        self.metrics.close()


class IlfPythonModel(_PythonModel):
    """Layout "python": the bundle runs inside this model on a registered backend."""

    def open_generator(self, bundle: Bundle, params: dict[str, str], args: dict[str, str]) -> Generator:
        from ilf_deploy.engines.backends import AUTO, get_backend, open_bundle_generator

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
        from ilf_deploy.serving.triton.repository import segment_model_name

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
