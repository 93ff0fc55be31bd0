"""benchmarks/peaks.py judges each candidate against the best peak of the arithmetic it really runs:
OpenVINO's bf16 hint runs f32 kernels on a CPU without bf16, so there it is an fp32 peak."""

from __future__ import annotations

import pytest

from benchmarks import peaks
from ilf_deploy.engines.backends import machine

TORCH = {"torch fp32": 100e9, "numpy fp32": 110e9, "torch bf16": 15e9}
ENGINES = {"openvino bf16": 180e9, "onnxruntime int8-dynamic": 190e9}


@pytest.mark.parametrize("has_bf16, best_bf16, best_fp32", [(False, 15e9, 180e9), (True, 180e9, 110e9)])
def test_openvinos_bf16_hint_is_an_fp32_peak_where_the_cpu_has_no_bf16(
    monkeypatch, has_bf16, best_bf16, best_fp32
):
    monkeypatch.setattr(peaks, "torch_peaks", lambda n, reps: dict(TORCH))
    monkeypatch.setattr(peaks, "measure_engine_peak", lambda key, n, reps: ENGINES[key])
    monkeypatch.setattr(machine, "cpu_has_bf16", lambda: has_bf16)
    measured = peaks.measure_peaks(list(ENGINES))
    assert measured["best bf16"] == best_bf16 and measured["best fp32"] == best_fp32
    assert measured["best int8"] == 190e9 and measured["openvino bf16"] == 180e9  # the figure itself stays
