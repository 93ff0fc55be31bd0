"""The C++ runtime (cpp/, `ilf-run`) vs the Python runtime on the same engine and precision
(OpenVINO CPU, f32 pinned), interleaved, from the same latents and prompt.

overhead  the tiny PixArt-α model, where the engine's work is small and the runtime's shows: per
          denoising step, wall time minus one common floor, the time inside OpenVINO's infer() for
          the same calls as C++ measures it (the same compiled models: the engine's own work); also
          wall time minus each runtime's engine call (C++: ilf::Engine::run; Python:
          SegmentRunner.infer_impl), the loop's glue alone, and minus each one's infer() (Python:
          the bindings' infer(), which holds their numpy conversions). Target: C++ overhead per
          step <= 50 % of Python's (the common floor).
ilf10     a whole ILF-10 run (text encoder, 10 steps, VAE decode) on the PixArt-XL-2 config (611M,
          random weights, benchmarks/backbone.py's model at 256 px; --quick: its 8-layer model).
          Target: C++ no slower than Python.

Each round runs `ilf-run --runs K` (its first run, which compiles or imports the models, is dropped)
and then K runs of the Python generator in this process (its first round warms it); medians over
rounds. The machine is shared: only the ratios within one run mean anything.

    python -m benchmarks.cpp [--quick] [--parts overhead,ilf10] [--rounds N] [--runs K]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
PROMPT = "a small red circle on a blue background"
OVERHEAD_TARGET = 0.5  # C++ overhead per step / Python's


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ilf_run_binary() -> Path:
    path = Path(sys.executable).parent / "ilf-run"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: build it with `make cpp`")
    return path


def tiny_bundle(work: Path) -> Path:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        log(f"building the tiny PixArt-α bundle in {work}")
        model = make_tiny_pipeline("pixart-alpha", work / "model", seed=7, num_layers=6)
        build_bundle(model, bundle, BuildOptions(plans=("base-20", "ilf-10"), copy_model=False, force=True))
    return bundle


def xl_bundle(quick: bool) -> Path:
    """benchmarks/backbone.py's bundle of the PixArt-XL config if it was built, else one built here."""
    from benchmarks.backbone import QUICK, Size, model_and_bundle

    size = QUICK if quick else Size()
    existing = OUT / size.tag / "bundle"
    if (existing / "manifest.json").is_file() and (existing / "plans" / "ilf-10.json").is_file():
        return existing
    work = OUT / "cpp" / size.tag
    if not (work / "bundle" / "manifest.json").is_file():
        log(f"building the {size.tag} bundle (minutes at full size)")
    return model_and_bundle(work, size, ("ilf-10",))[1]


class TimedInfer:
    """Wraps an OpenVINO infer request: seconds inside the bindings' infer(), by segment."""

    def __init__(self, request: Any, name: str, sink: dict[str, float]) -> None:
        self.request, self.name, self.sink = request, name, sink

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.request.infer(*args, **kwargs)
        finally:
            self.sink[self.name] = self.sink.get(self.name, 0.0) + time.perf_counter() - start


def python_runner(bundle: Path, plan_name: str, threads: int | None):
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends import open_generator

    generator = open_generator(bundle, "openvino", variant="f32", threads=threads)
    segments, infer_s = generator.segments, {}
    original = segments._request

    def timed_request(name: str, shapes: Any = None) -> Any:
        return TimedInfer(original(name, shapes), name, infer_s)

    segments._request = timed_request
    plan = generator.bundle.plan(plan_name)
    request = Request(prompt=PROMPT)

    def once(latents: np.ndarray, decode: bool) -> dict[str, Any]:
        infer_s.clear()
        segments.timings.clear()
        start, cpu = time.perf_counter(), time.process_time()
        x = generator.generate_latents(plan, request, latents)
        denoised = time.perf_counter()
        if decode:
            generator.decode(x)
        done = time.perf_counter()
        return {
            "latents_s": denoised - start,
            "total_s": done - start,
            "cpu_s": time.process_time() - cpu,
            "infer_s": sum(infer_s.values()),
            "engine_s": sum(sum(v) for v in segments.timings.values()),  # around infer_impl
            "latents": generator.latents_to_numpy(x),
        }

    return generator, plan, once


def cpp_runs(
    binary: Path, bundle: Path, plan: str, args: list[str], runs: int, work: Path, decode: bool
) -> dict:
    report = work / "cpp.json"
    command = [
        str(binary),
        str(bundle),
        "--plan",
        plan,
        *args,
        "--runs",
        str(runs + 1),
        "--json",
        str(report),
        "--force",  # every round writes the same report and latents
    ]
    command += ["--latents-out", str(work / "cpp.npy"), "-q"] + (
        ["--out", str(work / "cpp.png")] if decode else []
    )
    start = time.perf_counter()
    subprocess.run(command, check=True)
    process_s = time.perf_counter() - start
    data = json.loads(report.read_text())
    measured = data["runs"][1:]  # the first compiles (or imports) every model
    return {
        "process_s": process_s,
        "load_s": data["load_s"],
        "runs": [
            {
                "latents_s": r["latents_s"],
                "total_s": r["total_s"],
                "cpu_s": r["cpu_s"],
                "infer_s": sum(s["total_s"] for s in r["inference"].values()),
                "engine_s": sum(s["total_s"] for s in r["segments"].values()),  # around Engine::run
            }
            for r in measured
        ],
        "latents": np.load(work / "cpp.npy"),
    }


def compare(
    binary: Path,
    bundle: Path,
    plan_name: str,
    rounds: int,
    runs: int,
    threads: int | None,
    decode: bool,
    work: Path,
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    generator, plan, python_once = python_runner(bundle, plan_name, threads)
    rng = np.random.default_rng(0)
    from ilf_deploy.core.runtime.generator import Request

    latents = rng.standard_normal((1, 4, *generator.latent_size(Request(prompt=PROMPT))), dtype=np.float32)
    np.save(work / "in.npy", latents)
    tokenizer = generator.tokenizer
    ids = [tokenizer.encode(t.lower().strip()).ids for t in ("", PROMPT)]
    np.save(work / "ids.npy", np.array(ids, dtype=np.int64))
    args = ["--token-ids", str(work / "ids.npy"), "--latents-in", str(work / "in.npy")]
    if threads:
        args += ["--threads", str(threads)]
    python_once(latents, decode)  # warm-up: compile (or import) every model
    samples: dict[str, list[dict[str, float]]] = {"cpp": [], "python": []}
    processes, last = [], {}
    for index in range(rounds):
        log(f"  round {index + 1}/{rounds}: C++ then Python, {runs} runs each")
        cpp = cpp_runs(binary, bundle, plan_name, args, runs, work, decode)
        samples["cpp"] += cpp["runs"]
        processes.append({"process_s": cpp["process_s"], "load_s": cpp["load_s"]})
        last["cpp"] = cpp["latents"]
        for _ in range(runs):
            result = python_once(latents, decode)
            last["python"] = result.pop("latents")
            samples["python"].append(result)
    steps = plan.num_steps
    key = "total_s" if decode else "latents_s"

    def per_step(name: str, minus: str | None, floor: list[float] | None = None) -> float:
        values = [
            (s[key] - (s[minus] if minus else 0.0) - (f if floor is not None else 0.0)) / steps
            for s, f in zip(samples[name], floor or [0.0] * len(samples[name]))
        ]
        return statistics.median(values)

    cpp_floor = [s["infer_s"] for s in samples["cpp"]]
    floor = [statistics.median(cpp_floor)] * len(samples["python"])
    result = {
        "plan": plan_name,
        "steps": steps,
        "block_forwards": plan.block_forwards,
        "decode": decode,
        "median_run_s": {n: statistics.median(s[key] for s in samples[n]) for n in samples},
        "median_run_cpu_s": {n: statistics.median(s["cpu_s"] for s in samples[n]) for n in samples},
        "median_step_s": {n: per_step(n, None) for n in samples},
        "overhead_step_s": {n: per_step(n, "infer_s") for n in samples},
        "glue_step_s": {n: per_step(n, "engine_s") for n in samples},
        "overhead_vs_cpp_floor_step_s": {
            "cpp": per_step("cpp", "infer_s"),
            "python": per_step("python", None, floor),
        },
        "median_infer_s": {n: statistics.median(s["infer_s"] for s in samples[n]) for n in samples},
        "cpp_processes": processes,
        "latents_rel_l2": float(
            np.linalg.norm(last["cpp"] - last["python"]) / max(np.linalg.norm(last["python"]), 1e-12)
        ),
        "samples": samples,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpp", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; the 8-layer XL-config model")
    parser.add_argument("--parts", default="overhead,ilf10", help="comma-separated subset of overhead,ilf10")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (C++ then Python)")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per runtime and round")
    parser.add_argument(
        "--threads", type=int, default=None, help="OpenVINO inference threads (default: its own)"
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"overhead", "ilf10"}:
        parser.error(f"unknown parts {sorted(parts - {'overhead', 'ilf10'})}")
    from ilf_deploy.engines.backends.machine import fingerprint

    binary = ilf_run_binary()
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "cpp",
        "command": " ".join(["python -m benchmarks.cpp", *(argv if argv is not None else sys.argv[1:])]),
        "ilf_run": version,
        "machine": fingerprint(),  # CPU model, instruction-set flags, cores, library versions
        "engine": "openvino CPU f32 (INFERENCE_PRECISION_HINT=f32, PERFORMANCE_HINT=LATENCY), both runtimes",
    }
    started = time.perf_counter()
    if "overhead" in parts:
        rounds, runs = args.rounds or (3 if args.quick else 10), args.runs or (3 if args.quick else 10)
        log(f"overhead: tiny PixArt-α, ilf-10 latents, {rounds} rounds x {runs} runs")
        bundle = tiny_bundle(OUT / "cpp" / "tiny")
        o = result["overhead"] = compare(
            binary, bundle, "ilf-10", rounds, runs, args.threads, False, OUT / "cpp" / "o"
        )
        floor, glue, infer = (
            o[k] for k in ("overhead_vs_cpp_floor_step_s", "glue_step_s", "overhead_step_s")
        )
        o["ratios"] = {
            "vs_cpp_infer_floor": floor["cpp"] / floor["python"],  # the headline
            "outside_engine_call": glue["cpp"] / glue["python"],
            "outside_own_infer": infer["cpp"] / infer["python"],
        }
        o["overhead_ratio"] = o["ratios"]["vs_cpp_infer_floor"]
        o["met"] = o["overhead_ratio"] <= OVERHEAD_TARGET
        ms = {k: {n: v * 1e3 for n, v in d.items()} for k, d in o.items() if k.endswith("step_s")}
        r, verdict = o["ratios"], "met" if o["met"] else "MISSED"
        wall, over = ms["median_step_s"], ms["overhead_vs_cpp_floor_step_s"]
        glue, own = ms["glue_step_s"], ms["overhead_step_s"]
        alone = o["median_infer_s"]["cpp"] / o["steps"] * 1e3
        print(
            f"overhead  per step: C++ {wall['cpp']:.2f} ms, Python {wall['python']:.2f} ms (infer() alone "
            f"{alone:.2f} ms); over that floor: C++ {over['cpp']:.3f} ms, Python {over['python']:.3f} ms -> "
            f"{r['vs_cpp_infer_floor']:.0%} (target <= {OVERHEAD_TARGET:.0%}: {verdict}); outside each "
            f"one's engine call: {glue['cpp']:.3f} vs {glue['python']:.3f} ms "
            f"({r['outside_engine_call']:.0%}); "
            f"outside each one's infer(): {own['cpp']:.3f} vs {own['python']:.3f} ms "
            f"({r['outside_own_infer']:.0%}); latents rel. L2 {o['latents_rel_l2']:.1e}",
            flush=True,
        )
    if "ilf10" in parts:
        rounds, runs = args.rounds or (2 if args.quick else 3), args.runs or 1
        bundle = xl_bundle(args.quick)
        log(f"ilf10: {bundle}, {rounds} rounds x {runs} runs (text encoder, 10 steps, VAE decode)")
        w = result["ilf10"] = compare(
            binary, bundle, "ilf-10", rounds, runs, args.threads, True, OUT / "cpp" / "w"
        )
        w["bundle"] = str(bundle)
        t = w["median_run_s"]
        w["speedup"], w["met"] = t["python"] / t["cpp"], t["cpp"] <= t["python"]
        cpu = w["median_run_cpu_s"]
        w["speedup_cpu"] = cpu["python"] / cpu["cpp"]
        infer, verdict = w["median_infer_s"], "met" if w["met"] else "MISSED"
        print(
            f"ilf10     whole run: C++ {t['cpp']:.2f} s, Python {t['python']:.2f} s -> {w['speedup']:.3f}x "
            f"(target: no slower: {verdict}); inside infer(): C++ {infer['cpp']:.2f} s, "
            f"Python {infer['python']:.2f} s; CPU time C++ {cpu['cpp']:.1f} s, Python {cpu['python']:.1f} s "
            f"({w['speedup_cpu']:.3f}x); latents rel. L2 {w['latents_rel_l2']:.1e}",
            flush=True,
        )
    result["elapsed_s"] = time.perf_counter() - started
    path = OUT / ("cpp-quick.json" if args.quick else "cpp.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")
    shutil.rmtree(OUT / "cpp" / "o", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
