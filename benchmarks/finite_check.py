"""The denoising loop's finite check (core/runtime/loop.py `check_finite`, issue 31): its cost per step
against a whole step on the tiny PixArt-Σ model (ONNX Runtime fp32), where a step is cheapest and the
check's share largest. Target: <= 1 % of a step.

A round times one `base-20` generation with the check and one with it replaced by a no-op
(interleaved), and the check alone on the same latents; medians over rounds.

    python -m benchmarks.finite_check [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path("out/bench")
TARGET = 0.01  # the check's time / one step's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)

    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.core.runtime import loop
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.model.tiny import make_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_pipeline("pixart-sigma", Path(tmp) / "model", seed=7, num_layers=6)
        bundle = build_bundle(model, Path(tmp) / "bundle", BuildOptions(plans=("base-20",)))
        generator = open_generator(bundle, "onnxruntime")
        plan = generator.bundle.plan("base-20")
        request = Request(prompt="a small red circle")
        latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
        real = loop.check_finite

        def run(check) -> float:
            loop.check_finite = check
            start = time.perf_counter()
            generator.generate_latents(plan, request, latents)
            return (time.perf_counter() - start) / plan.num_steps

        run(real)  # warm up
        with_check, without, alone = [], [], []
        for _ in range(rounds):
            with_check.append(run(real))
            without.append(run(lambda *a: None))
            step = plan.steps[0]
            start = time.perf_counter()
            for _ in range(1000):
                real(latents, step, plan)
            alone.append((time.perf_counter() - start) / 1000)
        loop.check_finite = real

    result = {
        "step_s": statistics.median(with_check),
        "step_without_check_s": statistics.median(without),
        "check_s": statistics.median(alone),
        "latents": list(latents.shape),
        "rounds": rounds,
        "samples": {"with_check": with_check, "without": without, "alone": alone},
    }
    result["check_share_of_step"] = result["check_s"] / result["step_s"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "finite_check.json").write_text(json.dumps(result, indent=2))
    share = result["check_share_of_step"]
    print(
        f"finite check {result['check_s'] * 1e6:.1f} µs per step; a step {result['step_s'] * 1e3:.2f} ms "
        f"(without the check {result['step_without_check_s'] * 1e3:.2f} ms): {share:.3%} of a step "
        f"(target <= {TARGET:.0%}) {'OK' if share <= TARGET else 'OVER'}"
    )
    return 0 if share <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
