"""Where a bundle segment's time goes on ONNX Runtime CPU, by operator, fp32 vs a variant.

python -m benchmarks.int8_cpu --modes int8-dynamic        # makes the bundle below
python -m experiments.ort_op_profile out/bench/int8/l8-h16/bundle blocks_02_05 --variant int8_dynamic
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.manifest import SegmentSpec


def dummy_feeds(spec: SegmentSpec, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Random inputs for the segment's declared I/O, symbolic dims from `sizes`."""
    rng = np.random.default_rng(0)
    feeds = {}
    for item in spec.inputs:
        shape = [d if isinstance(d, int) else sizes[d] for d in item.shape]
        feeds[item.name] = rng.standard_normal(shape).astype(item.dtype)
    return feeds


def profile(path: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> collections.Counter:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the runtime's default
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "ilf_ort_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for _ in range(runs):
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    trace = Path(session.end_profiling())
    per_op: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / runs / 1000  # ms per run
    trace.unlink()
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("segment")
    parser.add_argument("--variant", help="e.g. int8_dynamic")
    parser.add_argument("--batch", type=int, default=2, help="rows (2 = one guided image)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle, verify_hashes=False)
    sizes = {"batch": args.batch, "tokens": args.tokens, "text_tokens": args.text_tokens}
    feeds = dummy_feeds(bundle.segment_spec(args.segment), sizes)
    variants = [None] + ([args.variant] if args.variant else [])
    for variant in variants:
        spec = bundle.segment_spec(args.segment, variant)
        per_op = profile(bundle.path / spec.file, feeds, args.runs, args.threads)
        total = sum(per_op.values())
        print(f"{variant or 'fp32'}: {total:.0f} ms per run (kernel time)")
        for op, ms in per_op.most_common(8):
            print(f"  {op:24s} {ms:7.1f} ms  {100 * ms / total:4.1f} %")


if __name__ == "__main__":
    main()
