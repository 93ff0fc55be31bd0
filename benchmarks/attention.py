"""One attention of a PixArt-XL block ([2, 16, T, 72]: CFG batch 2, 16 heads of 72) on each engine that
could run it, at T = 256 and 1024 image tokens (256 and 512 px), interleaved, medians (issue 35).

- OpenVINO, bf16 hint, the attention as our exporter writes it (MatMul, scale, Softmax, MatMul: the
  CPU plugin fuses it into one snippet subgraph), and the same without snippets (oneDNN MatMul +
  Softmax);
- OpenVINO's own `ScaledDotProductAttention` op (opset 13), with and without snippets;
- torch's bf16 `scaled_dot_product_attention` (its flash-attention CPU kernel: what diffusers'
  blocks call).

The OpenVINO models take f32 inputs (as a block's do) and convert them inside; torch gets bf16.

    python -m benchmarks.attention [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
BATCH, HEADS, HEAD_DIM = 2, 16, 72
TOKENS = (256, 1024)


def ov_attention(tokens: int, fused_op: bool) -> Any:
    import openvino as ov
    import openvino.opset13 as ops

    shape = [BATCH, HEADS, tokens, HEAD_DIM]
    q, k, v = (ops.parameter(shape, np.float32, name=n) for n in "qkv")
    if fused_op:
        out = ops.scaled_dot_product_attention(q, k, v, causal=False)
    else:
        scores = ops.multiply(ops.matmul(q, k, False, True), ops.constant(np.float32(HEAD_DIM**-0.5)))
        out = ops.matmul(ops.softmax(scores, -1), v, False, False)  # [B, H, T, D]
    return ov.Model([out], [q, k, v])


def runners(tokens: int, threads: int) -> dict[str, Callable[[], Any]]:
    import torch

    from ilf_deploy.engines.backends.openvino import core

    rng = np.random.default_rng(0)
    qkv = [rng.standard_normal((BATCH, HEADS, tokens, HEAD_DIM), dtype=np.float32) for _ in range(3)]
    config = {
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
    }
    found: dict[str, Callable[[], Any]] = {}
    for fused_op in (False, True):
        for snippets in (True, False):
            name = f"openvino {'SDPA op' if fused_op else 'exported'}{'' if snippets else ', no snippets'}"
            extra = {} if snippets else {"SNIPPETS_MODE": "DISABLE"}
            compiled = core().compile_model(ov_attention(tokens, fused_op), "CPU", {**config, **extra})
            request = compiled.create_infer_request()
            found[name] = lambda r=request: r.infer(qkv)
    torch.set_num_threads(threads)
    as_bf16 = [torch.from_numpy(a).bfloat16() for a in qkv]
    found["torch bf16 SDPA"] = lambda: torch.nn.functional.scaled_dot_product_attention(*as_bf16)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    from benchmarks.backbone import interleaved
    from ilf_deploy.engines.backends.machine import cpu_count, fingerprint

    results: dict[str, Any] = {"machine": fingerprint(), "rounds": args.rounds}
    for tokens in TOKENS:
        flops = 2 * 2 * BATCH * HEADS * tokens * tokens * HEAD_DIM  # Q·Kᵀ and P·V
        times = interleaved(runners(tokens, cpu_count()), args.rounds, warmup=3)
        medians = {name: statistics.median(samples) for name, samples in times.items()}
        results[str(tokens)] = {n: {"ms": s * 1e3, "gflops": flops / s / 1e9} for n, s in medians.items()}
        for name, row in results[str(tokens)].items():
            print(f"  {tokens:5d} tokens  {name:34s} {row['ms']:8.2f} ms  {row['gflops']:6.0f} GFLOP/s")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "attention.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
