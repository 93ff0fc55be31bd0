"""What makes a batch's images, wherever it runs (this process, a local pool, a Ray actor).

A worker opens the bundle once (its files' hashes and the pinned digest checked) and makes each
image exactly as `ilf-deploy generate` does: one request, one `generate_latents` + `decode`, the PNG
written by PIL with its defaults. So a row's image is `generate`'s, bit for bit (a batched engine
call may differ from a batch of one by float rounding, so rows are never batched into one call).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.engines.backends.plans import resolve_bundle_plan

Outcome = tuple[dict[str, Any], bytes | None]  # a row's result and its image's PNG (None: failed)


def job(index: int, plan: str, request: Request) -> dict[str, Any]:
    """What a worker is sent for one row: the plan and the request, resolved by the contract."""
    return {"index": index, "plan": plan, "request": asdict(request)}


def worker_identity() -> dict[str, Any]:
    """Which node and process this is: Ray's node id inside a Ray worker, else None."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}


def encode_png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # what `generate --out x.png` writes
    return buffer.getvalue()


class BatchWorker:
    """One engine over one bundle; `run` makes one row's image."""

    def __init__(
        self,
        bundle: str | Path,
        backend: str | None = None,
        variant: str | None = None,
        digest: str | None = None,
        generator: Generator | None = None,
        plans: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`plans`: the driver's resolved plans by spec (StepPlan.to_dict), so that `auto`, a plan
        file or a preset is the plan the driver checked, whichever node runs the row."""
        if generator is None:
            from ilf_deploy.engines.backends import open_generator
            from ilf_deploy.engines.backends.auto import AUTO

            generator = open_generator(bundle, backend or AUTO, variant=variant, digest=digest)
            self.bundle = generator.opened_bundle()  # hashes and pin: checked by the load above
        else:  # the driver's engine: the bundle it was opened from must be the pinned one
            self.bundle = generator.opened_bundle(digest)
        self.generator = generator
        self.identity = worker_identity()
        self._plans = {spec: StepPlan.from_dict(data) for spec, data in (plans or {}).items()}

    def plan(self, spec: str) -> StepPlan:
        if spec not in self._plans:
            self._plans[spec] = resolve_bundle_plan(self.bundle, spec)  # the one resolver
        return self._plans[spec]

    def run(self, work: dict[str, Any]) -> Outcome:
        """({index, sha256, seconds, finished, worker, error}, the PNG or None) for one job."""
        started = time.perf_counter()
        result: dict[str, Any] = {"index": work["index"], "worker": self.identity}
        try:
            request = Request(**work["request"])
            with self.generator.inference_context():
                latents = self.generator.generate_latents(self.plan(work["plan"]), request)
                png = encode_png(self.generator.decode(latents)[0])
        except Exception as exc:  # the row fails, the batch goes on
            result.update(error=f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
            return {**result, "finished": round(time.time(), 4)}, None
        seconds = round(time.perf_counter() - started, 4)
        result.update(sha256=hashlib.sha256(png).hexdigest(), seconds=seconds, finished=round(time.time(), 4))
        return result, png

    def run_many(self, works: list[dict[str, Any]]) -> list[Outcome]:
        return [self.run(work) for work in works]
