"""Probe for issue 35: can torch run a PixArt-XL block faster than OpenVINO int8-ov +bf16 on AMX?

One block of the peer benchmark's model (`python -m benchmarks.peer --prepare-only` builds it) at 256
or 1024 tokens, CFG batch 2, random inputs, interleaved medians: torch bf16 eager, bf16 compiled, and
int8 through torchao's PT2E flow (X86InductorQuantizer: static per-tensor activations, per-channel
weights; Inductor with freezing lowers the quantized linears to oneDNN, AMX-INT8 where the CPU has
it), the rest fp32 or bf16 under autocast (so the attention runs on torch's flash SDPA kernel).
Calibrated on three scalings of the timed input only: a speed probe, not an accuracy claim. Needs
`pip install torchao==0.18.0` (not a dependency of ilf-deploy). `--openvino BUNDLE` adds, interleaved
in the same rounds, what `auto` runs on that bundle: its first blocks segment from the `int8_ov`
variant with the bf16 hint, compiled static as `OvSegments` compiles it, per block (÷ its blocks).

    python -m experiments.torch_int8_block [--tokens 256|1024] [--rounds 10] [--openvino BUNDLE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

MODEL = "out/bench/peer/full/model/transformer"


def quantized_int8(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.nn.Module:
    """The block through PT2E: export, observers, three calibration calls, convert."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(copy.deepcopy(block), args, kwargs).module(), quantizer)
    for scale in (0.5, 1.0, 1.5):
        prepared(args[0] * scale, **kwargs)
    converted = convert_pt2e(prepared)
    # diffusers' `.to(float32)` is exported as a dtype assertion, which autocast's bf16 would fail
    for node in list(converted.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            converted.graph.erase_node(node)
    converted.recompile()
    return converted


def engines(block: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> dict[str, Callable[[], Any]]:
    import torch._inductor.config as inductor

    inductor.freezing = True
    x16, kwargs16 = x.bfloat16(), {k: v.bfloat16() for k, v in kwargs.items()}
    eager16 = copy.deepcopy(block).bfloat16()
    compiled16 = torch.compile(copy.deepcopy(block).bfloat16())
    int8 = quantized_int8(block, (x,), kwargs)
    int8_fp32, int8_bf16 = torch.compile(int8), torch.compile(copy.deepcopy(int8))

    def int8_autocast() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return int8_bf16(x, **kwargs)

    return {
        "torch bf16 eager": lambda: eager16(x16, **kwargs16),
        "torch bf16 compiled": lambda: compiled16(x16, **kwargs16),
        "torch int8 PT2E compiled, rest fp32": lambda: int8_fp32(x, **kwargs),
        "torch int8 PT2E compiled, rest bf16": int8_autocast,
    }


def openvino_block(bundle_dir: str, tokens: int, variant: str = "int8_ov") -> tuple[Callable[[], Any], int]:
    """One call of the bundle's first blocks segment (`variant`, bf16 hint) on random inputs shaped as
    the timed block's, and how many blocks it holds."""
    from benchmarks.backbone import TEXT_TOKENS
    from experiments.int8_attention import random_feeds
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.engines.backends.openvino import open_generator

    bundle = Bundle.load(bundle_dir)
    segments = open_generator(bundle, variant, precision="bf16", cache=False).segments
    name = next(n for n in bundle.manifest.segments if n.startswith("blocks_"))
    first, last = bundle.manifest.segments[name].blocks  # inclusive block range
    inputs = bundle.segment_spec(name, variant).input_names
    feeds = random_feeds(segments.read_model(name), inputs, tokens, TEXT_TOKENS)
    return (lambda: segments.infer_impl(name, feeds)), last - first + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--openvino", metavar="BUNDLE", help="also time this bundle's int8_ov block, bf16 hint"
    )
    args = parser.parse_args(argv)
    from diffusers import PixArtTransformer2DModel

    from benchmarks.backbone import TEXT_TOKENS, Size, block_flops, interleaved
    from ilf_deploy.engines.backends.machine import cpu_count

    torch.set_num_threads(cpu_count())
    block = PixArtTransformer2DModel.from_pretrained(MODEL).transformer_blocks[0].eval()
    width, g = block.attn1.to_q.in_features, torch.Generator().manual_seed(0)
    x = torch.randn(2, args.tokens, width, generator=g)  # [CFG batch, tokens, width]
    kwargs = {
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, width, generator=g),
        "timestep": torch.randn(2, 6 * width, generator=g) * 0.1,  # adaLN-single: 6 modulations
    }
    with torch.no_grad():
        reference = block(x, **kwargs)
        runs = engines(block, x, kwargs)
        for name, run in runs.items():  # the first call compiles
            error = ((run().float() - reference).norm() / reference.norm()).item()
            print(f"  {name}: rel L2 to fp32 eager {error:.1e}")
        per_call = dict.fromkeys(runs, 1)
        if args.openvino:
            label = "OpenVINO int8_ov, bf16 hint (per block)"
            runs[label], per_call[label] = openvino_block(args.openvino, args.tokens)
        times = interleaved(runs, args.rounds, warmup=2)
    flops = block_flops(Size(), tokens=args.tokens)
    for name, samples in times.items():
        median = statistics.median(samples) / per_call[name]
        print(
            f"  {args.tokens} tokens  {name:38s} {median * 1e3:8.2f} ms  {flops / median / 1e9:6.0f} GFLOP/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
