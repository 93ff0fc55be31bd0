"""A backend added the way the README's "Adding a backend" says: one module + one registry entry.

It runs the bundle's ONNX segments on ONNX Runtime but counts every segment call, so tests can see
that `open_generator`, the CLI and `bench` reach it through the registry alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.engines.backends.onnxruntime import OrtSegments

CALLS: Counter[str] = Counter()


class CountingSegments(OrtSegments):
    backend = "counting"

    def infer_impl(self, name: str, feeds: dict[str, Any]) -> dict[str, Any]:
        CALLS[name] += 1
        return super().infer_impl(name, feeds)


def open_generator(bundle: Bundle, variant: str | None = None, device: str = "cpu") -> BundleGenerator:
    return BundleGenerator(bundle, CountingSegments(bundle, ["CPUExecutionProvider"], None, variant))
