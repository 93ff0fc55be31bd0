"""What one server holds: its options, the bundle, the engine, the request contract, the batcher,
the metrics and the per-key limiter, built once by `ServerState.open` (routes read it from
`app.state.ilf`)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilf_deploy.core.batching import BatchingPolicy
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.core.runtime.request import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    CheckedRequest,
    RequestContract,
)
from ilf_deploy.engines.backends.plans import PlanBook
from ilf_deploy.serving.serve.auth import ApiKeys
from ilf_deploy.serving.serve.batcher import Batcher, BatchKey
from ilf_deploy.serving.serve.connections import (
    MIN_FREE_DESCRIPTORS,
    default_max_connections,
    descriptor_limit,
)
from ilf_deploy.serving.serve.images import URL_TTL_S, ImageStore
from ilf_deploy.serving.serve.limiter import KeyLimiter
from ilf_deploy.serving.serve.limits import DRAIN_S, MAX_TIMEOUT_S, check_drain_s
from ilf_deploy.serving.serve.metrics import ServerMetrics
from ilf_deploy.serving.serve.schema import ResponseForm, check_request

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")  # an OpenAI-style model id
MAX_URL_TTL_S = 86_400.0


@dataclass(frozen=True)
class ServeOptions(BatchingPolicy):
    """The batching policy (max_batch, max_wait_ms, max_queue, timeout_s, max_n: core/batching.py, shared
    with Triton and Ray Serve) and what only this server has."""

    backend: str = "auto"  # `ilf-deploy tune`'s winner on this machine, else ONNX Runtime fp32
    default_plan: str | None = None  # any plan spec (backends.plans); None: the bundle's Bundle.default_plan
    warmup: bool = True
    max_body_bytes: int = 1 << 20
    # No keys: no authentication (the default, for loopback use).
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_inflight_per_key: int | None = None  # images one key may have queued or running; beyond: 429
    digest: str | None = None  # --digest: serve only the bundle with this digest
    # The connection layer (serving/serve/connections.py) and shutdown (serving/serve/server.py):
    header_timeout_s: float = 10.0  # a request's headers, from its connection or last response: 408
    body_timeout_s: float = 30.0  # a request's body, from its headers on: 408
    max_connections: int | None = None  # None: connections.default_max_connections (below ulimit -n)
    drain_s: float = DRAIN_S  # on SIGTERM, how long the batch in the engine may still run
    # OpenAI compatibility (docs/serving.md ("OpenAI compatibility")):
    model_name: str | None = None  # the id in /v1/models and `model`; None: the bundle directory's name
    url_ttl_s: float = URL_TTL_S  # how long a `response_format: "url"` link answers

    def check(self) -> None:
        self.check_batching()
        self._check_connections()
        if self.model_name is not None and not MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError(
                f"--model-name must be 1..128 of letters, digits and . _ - : /, got {self.model_name!r}"
            )
        if not 0 < self.url_ttl_s <= MAX_URL_TTL_S:
            raise ConfigError(f"--url-ttl-s must be > 0 and <= {MAX_URL_TTL_S:g}, got {self.url_ttl_s}")
        if self.max_inflight_per_key is not None:
            if not self.api_keys:
                raise ConfigError(
                    "--max-inflight-per-key needs API keys (--api-key-file FILE or ILF_API_KEYS)"
                )
            if self.max_inflight_per_key < self.max_n:  # else an `n = max_n` request could never pass
                raise ConfigError(
                    f"--max-inflight-per-key must be >= --max-n ({self.max_n}), "
                    f"got {self.max_inflight_per_key}"
                )

    def _check_connections(self) -> None:
        for flag, value in [
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
        ]:
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigError(f"{flag} must be > 0 and <= {MAX_TIMEOUT_S:g}, got {value}")
        check_drain_s(self.drain_s)
        limit = descriptor_limit()
        if self.max_connections is not None:
            most = limit - MIN_FREE_DESCRIPTORS if limit is not None else None
            if self.max_connections < 1 or (most is not None and self.max_connections > most):
                where = f" (ulimit -n is {limit}: at most {most})" if most is not None else ""
                raise ConfigError(f"--max-connections must be >= 1{where}, got {self.max_connections}")

    def connection_limit(self) -> int:
        return self.max_connections or default_max_connections()


@dataclass
class ServerState:
    options: ServeOptions
    bundle: Bundle
    generator: Generator
    contract: RequestContract
    plans: PlanBook  # the bundle's, the default (any spec form) and those requests name
    metrics: ServerMetrics
    batcher: Batcher
    limiter: KeyLimiter
    max_batch: int
    draining: bool = False  # SIGTERM: /readyz answers 503, new work 503
    images: ImageStore = field(default_factory=ImageStore)  # behind `response_format: "url"` links

    @classmethod
    def open(
        cls, bundle_path: str | Path, options: ServeOptions, generator: Generator | None = None
    ) -> ServerState:
        """The bundle's engine (`generator` replaces it: tests, wrappers), checked options."""
        options.check()
        if generator is None:
            from ilf_deploy.engines.backends import open_generator

            # the files' hashes, and the pinned digest if any: checked once, by the load that opens it
            generator = open_generator(bundle_path, options.backend, digest=options.digest)
            bundle = generator.opened_bundle()
        else:  # a caller's engine stands for the bundle it was opened from: that one must be the pin
            bundle = generator.opened_bundle(options.digest)
        plans = PlanBook(bundle, options.default_plan)  # the one resolver; `auto` decided here, once
        contract = RequestContract.for_bundle(bundle, generator, options.max_n, plans.default, plans.check)
        metrics = ServerMetrics()
        max_batch = options.images_per_call(bundle.manifest.max_batch)
        batcher = Batcher(
            generator,
            plans,
            metrics,
            max_batch,
            options.max_wait_s,
            options.max_queue,
        )
        limiter = KeyLimiter(options.max_inflight_per_key)
        return cls(
            options, bundle, generator, contract, plans, metrics, batcher, limiter, max_batch,
            images=ImageStore(options.url_ttl_s),
        )  # fmt: skip

    @property
    def model_id(self) -> str:
        return self.options.model_name or self.bundle.path.resolve().name

    def check(self, fields: dict[str, Any]) -> tuple[CheckedRequest, ResponseForm]:
        """A request body's fields -> the engine requests and the response's form, or a 400."""
        return check_request(self.contract, self.model_id, fields)

    def batch_key(self, checked: CheckedRequest) -> BatchKey:
        first = checked.requests[0]  # resolved: size and guidance decided
        assert checked.plan is not None and first.height is not None and first.width is not None
        return BatchKey(checked.plan, first.height, first.width, checked.guided)

    def warmup_request(self) -> tuple[str, Request] | None:
        """The default plan and size, guided as by default (the contract's), or None: no warm-up."""
        return self.contract.warmup_request() if self.options.warmup else None

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        self.batcher.start(self.warmup_request())
        try:
            yield
        finally:
            await self.batcher.close()
            self.metrics.ready.set(0)

    def begin_drain(self) -> None:
        """Shutdown's first step: not ready, no new work, every queued image answered 503."""
        self.draining = True
        self.metrics.ready.set(0)
        self.batcher.drain()

    def model_card(self) -> dict[str, Any]:
        """GET /v1/models' entry: the plans, sizes and every request limit."""
        contract = self.contract
        card = {
            "id": self.model_id,
            "object": "model",
            "created": int(self.bundle.path.joinpath("manifest.json").stat().st_mtime),
            "owned_by": "ilf-deploy",
            "architecture": contract.architecture,
            "plans": [
                {"name": spec, "steps": p.num_steps, "block_forwards": p.block_forwards}
                for spec, p in self.plans.pinned.items()  # a spec a request can send in `plan`
            ],
            "default_plan": contract.default_plan,
            "sizes": list(contract.size_names),
            "max_n": contract.max_n,
            "max_batch": self.batcher.max_batch,  # fewer where memory held fewer compiled sizes
            "max_prompt_tokens": contract.max_tokens,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_seed": MAX_SEED,
            "max_guidance_scale": MAX_GUIDANCE,
            "precision": self.bundle.manifest.precision,
            "digest": self.bundle.digest,
        }
        if contract.is_dit:
            card["num_classes"] = contract.num_classes
        return card
