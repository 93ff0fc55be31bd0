"""Probe for issue 35: do int8 attention BMMs (Q·Kᵀ, P·V) speed up OpenVINO's block, and at what error?

`int8-ov` quantized the linear layers only (`quantize.linear_nodes`), leaving the attention's two
batched MatMuls in float (bf16 under the hint), and at 1024 tokens (512 px) the attention is where
the block loses most (benchmarks/README.md, `attention`). OpenVINO's CPU plugin runs its attention
snippet in int8 when FakeQuantize sits on the BMMs' inputs. This takes a bundle's first blocks
segment and quantizes it twice with the NNCF call `int8-ov` makes (quantize_segment_openvino): the
linear layers only, and those plus the attention BMMs (`quantize.attention_bmms`: NNCF quantizes
Q·Kᵀ; its transformer pattern leaves the softmax output, so P·V, in float). Each is compiled with the
bf16 hint as `OvSegments` compiles `auto`'s winner, then:

- error: the segment's output against the fp32 segment (f32 hint) on the bundle's calibration
  samples held out from calibration (the last quarter; calibrated on the rest), rel. L2;
- speed: per block, interleaved, on random inputs at 256 and 1024 tokens (CFG batch 2).

A third variant adds the cross-attention query, scaled per token (`scale_per_token`): what `int8-ov`
quantizes now.

    python -m experiments.int8_attention [BUNDLE] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE = "out/bench/peer/full/bundle"


def random_feeds(
    model: Any, input_names: tuple[str, ...], tokens: int, text_tokens: int
) -> dict[str, np.ndarray]:
    """Random inputs for an OpenVINO model's ports: dynamic axes as batch 2 (guidance), then image
    tokens for the state and its feed, text tokens for the rest; attention biases zero (no mask)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for port in model.inputs:
        key = next(name for name in input_names if name in port.get_names())
        long = tokens if key in ("hidden", "feed") else text_tokens
        shape = [
            d.get_length() if d.is_static else (2 if i == 0 else long)
            for i, d in enumerate(port.get_partial_shape())
        ]
        random = rng.standard_normal(shape).astype(np.float32) * 0.1
        feeds[key] = np.zeros(shape, np.float32) if "bias" in key else random
    return feeds


def compiled(model_path: Path, shapes: dict[str, tuple[int, ...]], hint: str) -> Any:
    """`model_path` reshaped static to `shapes`, compiled for the CPU with `hint`, as a request."""
    import openvino as ov

    from ilf_deploy.engines.backends.openvino import core

    model = core().read_model(str(model_path))
    wanted = {port: next(k for k in shapes if k in port.get_names()) for port in model.inputs}
    model.reshape({port: ov.PartialShape(list(shapes[key])) for port, key in wanted.items()})
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    return core().compile_model(model, "CPU", config).create_infer_request()


def relative_error(source: Path, quantized: Path, held_out: list[dict[str, np.ndarray]]) -> float:
    """Median over `held_out` of the quantized segment's (bf16 hint) rel. L2 to the fp32 one (f32)."""
    shapes = {key: value.shape for key, value in held_out[0].items()}  # one trajectory: one shape set
    reference, candidate = compiled(source, shapes, "f32"), compiled(quantized, shapes, "bf16")
    errors = []
    for feeds in held_out:
        want, got = reference.infer(feeds)[0], candidate.infer(feeds)[0]
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return statistics.median(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=BUNDLE)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    import onnx

    from benchmarks.backbone import TEXT_TOKENS, Size, block_flops, interleaved
    from ilf_deploy.build.quantization.calibration import load_calibration
    from ilf_deploy.build.quantization.openvino import quantize_segment_openvino
    from ilf_deploy.build.quantization.quantize import attention_bmms, linear_nodes, per_token_nodes
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT
    from ilf_deploy.engines.backends.openvino import core

    bundle = Bundle.load(args.bundle)
    name = next(n for n in bundle.manifest.segments if n.startswith("blocks_"))
    first, last = bundle.manifest.segments[name].blocks  # inclusive block range
    source, inputs = bundle.segment_path(name), bundle.segment_spec(name).input_names
    graph = onnx.load(str(source), load_external_data=False)
    samples = load_calibration(bundle, name)
    cut = len(samples) - max(1, len(samples) // 4)
    linear, bmms = linear_nodes(graph, static=True), attention_bmms(graph)
    print(f"{name}: {len(linear)} linear layers, {len(bmms)} attention BMMs; {cut} samples calibrate, "
          f"{len(samples) - cut} held out")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="int8_attention_"))
    query = per_token_nodes(graph)  # the cross-attention query
    variants = {
        "int8-ov (linear layers)": (linear, []),
        "int8-ov + attention BMMs": (linear + bmms, []),
        "+ query per token (now)": (linear + bmms + query, query),
    }
    paths = {}
    for label, (nodes, per_token) in variants.items():
        paths[label] = work / f"{len(paths)}.xml"
        quantize_segment_openvino(source, paths[label], samples[:cut], nodes, per_token)
        print(f"  {label}: rel. L2 to fp32 {relative_error(source, paths[label], samples[cut:]):.4f}")
    exported = core().read_model(str(source))  # its ports, for the random inputs
    for tokens in (256, 1024):
        feeds = random_feeds(exported, inputs, tokens, TEXT_TOKENS)
        shapes = {key: value.shape for key, value in feeds.items()}
        requests = {label: compiled(path, shapes, "bf16") for label, path in paths.items()}
        runs = {label: (lambda r=request, f=feeds: r.infer(f)) for label, request in requests.items()}
        times = interleaved(runs, args.rounds, warmup=2)
        flops = block_flops(
            Size(), tokens=tokens, caption_kv=CROSS_KV_SEGMENT not in bundle.manifest.segments
        )
        for label, samples_s in times.items():
            per_block = statistics.median(samples_s) / (last - first + 1)
            rate = flops / per_block / 1e9
            print(f"  {tokens} tokens  {label:28s} {per_block * 1e3:8.2f} ms  {rate:6.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
