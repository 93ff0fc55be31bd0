"""Issue 21: `ilf-deploy batch` here vs on a Ray actor pool (run by `make bench`, not CI).

1. **Ray's overhead per image**: the local batch (this process's engine) vs the Ray batch on one node
   with one actor, same bundle and rows, interleaved (local, Ray, local, Ray, ...; medians). An image's
   time is the steady rate of one batch of N rows, from its first row's finish to its last's (the
   rows' `finished`): what start-up costs (connecting, starting the actor, opening the bundle) is
   left out and reported apart, and so is the engine's own time per image (the rows' `seconds`).
   Targets: Ray <= 10 % slower per image on the tiny bundle, <= 2 % on the PixArt-XL config
   (benchmarks/backbone.py's bundle). Over the same window, the cores each kind of process used
   (/proc): Ray's actor, the driver, Ray's other processes, the rest of the machine; on a machine
   whose engine uses every core, what the others take is what Ray's overhead is made of.
2. **Images/s at 1 and 2 actors** (Ray, one node with this machine's CPUs), beside the core count:
   on 2 cores two actors cannot be faster than one (each engine already uses every core), so this
   shows the overhead of a second actor, not scaling.

Ray runs in `tests/support/ray_sandbox.py`'s private network namespace (Ray binds to the interface
address), and so does every driver here, local ones too (the same process start-up for both).

    python -m benchmarks.batch [--quick] [--rows 64] [--rounds 2] [--xl-rows 2] [--xl-bundle DIR] [--no-xl]
                               [--no-tiny] [--worker-niceness N ...]

Writes out/bench/batch.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path("out/bench")
TARGETS = {"tiny": 0.10, "pixart-xl": 0.02}
PROMPT = "a small red circle on a blue background"


def tiny_bundle(root: Path) -> Path:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-4", "ilf-4"), copy_model=False))


def xl_bundle(given: Path | None) -> Path:
    if given is not None:
        return given
    from benchmarks.backbone import OUT as BACKBONE_OUT
    from benchmarks.backbone import Size, model_and_bundle

    return model_and_bundle(BACKBONE_OUT / Size().tag, Size(), ("base-20", "ilf-10"))[1]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One batch in this process (the driver): when its rows were finished, by the workers' clocks
    (one machine here, so the driver's clock too), from the driver's start; the engine's per image."""
    from ilf_deploy.serving.scale.batch import run_batch
    from ilf_deploy.serving.scale.options import BatchOptions

    started = time.time()
    options = BatchOptions(
        Path(spec["bundle"]), Path(spec["prompts"]), Path(spec["out"]), backend="onnxruntime",
        ray_address=spec["address"], actors=spec["actors"], batch_size=spec["batch_size"],
    )  # fmt: skip
    summary = run_batch(options)
    rows = [json.loads(line) for line in (Path(spec["out"]) / "results.jsonl").read_text().splitlines()]
    assert summary.images == len(rows) == spec["rows"], summary
    rows.sort(key=lambda r: r["finished"])
    return {
        "first_row_s": rows[0]["finished"] - started,
        "last_row_s": rows[-1]["finished"] - started,
        # the worker's own time per image over the rows the window spans: the first row's includes
        # the engine's first calls (its arenas), which made this exceed the time per image at 2 rows
        "engine_s": statistics.median(r["seconds"] for r in rows[1:] or rows),
        # the engine's mean over the rows the window spans (all but the first): per image minus this
        # is what handing rows over costs a row (Ray: mostly the actor waiting for its next task)
        "engine_window_s": statistics.mean(r["seconds"] for r in rows[1:]),
    }


def cpu_seconds() -> dict[int, tuple[str, int, float]]:
    """Every process's command line, start time (ticks since boot: a pid is reused, and Ray retitles
    its workers with each task) and CPU seconds so far (user + system), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        found[int(entry.name)] = (command, int(fields[19]), (int(fields[11]) + int(fields[12])) / tick)
    return found


KINDS = ("actor", "driver", "ray", "other")


def cores_line(cores: dict[str, float] | None) -> str:
    if not cores:
        return "not sampled"
    return ", ".join(f"{kind} {cores[kind]:.2f}" for kind in KINDS)


def cpu_beside(
    before: dict[int, tuple[str, int, float]],
    after: dict[int, tuple[str, int, float]],
    wall: float,
    driver: set[int],
) -> dict[str, float]:
    """Cores each kind of process used over `wall` seconds: Ray's actor (the engine, on Ray), the
    driver (the engine, locally; handing out tasks and writing the rows, on Ray), Ray's other
    processes (raylet, GCS, the dashboard agent...) and the rest of the machine."""
    cores = dict.fromkeys(KINDS, 0.0)
    for pid, (command, start, seconds) in after.items():
        started = pid not in before or before[pid][1] != start  # in the window: all of it counts
        used = seconds - (0.0 if started else before[pid][2])
        titles = (command, "" if started else before[pid][0])
        if any(title.startswith("ray::BatchActor") for title in titles):  # Ray retitles it per task
            kind = "actor"
        elif pid in driver:
            kind = "driver"
        elif command.startswith("ray::") or "/ray/" in command or "ray.util" in command:
            kind = "ray"
        else:
            kind = "other"
        cores[kind] += used / wall
    return cores


def watch(process: Any, results: Path, rows: int) -> dict[str, float] | None:
    """Wait for `process` (a batch of `rows`); the cores each kind of process used (`cpu_beside`)
    from the first row written to the last: the steady part the time per image is taken from."""
    from tests.support.ray_sandbox import descendants

    first = last = None
    while process.poll() is None:
        written = results.read_bytes().count(b"\n") if results.exists() else 0
        if written and first is None:
            first = (time.monotonic(), cpu_seconds())
        if written >= rows and last is None:
            last = (time.monotonic(), cpu_seconds())
            driver = {process.pid, *descendants(process.pid)}
        time.sleep(0.1)
    if first is None or last is None or last[0] - first[0] <= 0:
        return None
    return cpu_beside(first[1], last[1], last[0] - first[0], driver)


def run(
    sandbox: Any,
    bundle: Path,
    plan: str,
    rows: int,
    address: str | None,
    actors: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ilf-bench-batch-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        lines = [json.dumps({"prompt": PROMPT, "seed": i, "plan": plan}) for i in range(rows)]
        prompts.write_text("\n".join(lines) + "\n")
        spec = {"bundle": str(bundle), "prompts": str(prompts), "out": f"{tmp}/out", "address": address}
        spec.update(actors=actors, rows=rows, batch_size=batch_size)
        code = "import json, sys; from benchmarks.batch import child; print(json.dumps(child(json.loads(sys.argv[1]))))"  # noqa: E501
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with stdout.open("w") as out, stderr.open("w") as err:  # files: Ray's logs could fill a pipe
            process = sandbox.popen(
                [sys.executable, "-c", code, json.dumps(spec)], Path.cwd(), stdout=out, stderr=err
            )
            cores = watch(process, Path(spec["out"]) / "results.jsonl", rows)
        if process.returncode != 0:
            raise SystemExit(f"the batch failed:\n{stderr.read_text()[-3000:]}")
        return {**json.loads(stdout.read_text().strip().splitlines()[-1]), "cores": cores}


def per_image(
    sandbox: Any,
    bundle: Path,
    plan: str,
    rows: int,
    address: str | None,
    actors: int = 1,
    batch_size: int | None = None,
) -> dict:
    """Seconds per image without start-up: one batch of `rows`, its first row's finish to its last's,
    by the workers' own clocks (the driver sees Ray's rows in bunches: at --batch-size 16 two tasks
    arrived together; and differencing two batches of N and N/4 rows, as before, let start-up's own
    spread, 0.8 s between two Ray runs, decide the result)."""
    if rows < 2:
        raise SystemExit(f"--rows must be >= 2, got {rows}")
    load = os.getloadavg()[0]  # the machine is shared: a loaded one slows the engine, not the hand-over
    result = run(sandbox, bundle, plan, rows, address, actors, batch_size)
    seconds = (result["last_row_s"] - result["first_row_s"]) / (rows - 1)
    return {
        "per_image_s": seconds,
        "startup_s": result["first_row_s"] - seconds,
        "engine_s": result["engine_s"],
        "handoff_s": seconds - result["engine_window_s"],
        "load_1min": load,
        "cores": result["cores"],  # what each kind of process used in that window (cpu_beside)
        "batch": result,
    }


def overhead(
    clusters: dict[str, Any],
    name: str,
    bundle: Path,
    plan: str,
    rows: int,
    rounds: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Local vs Ray with one actor, interleaved; Ray's extra time per image as a fraction of local's
    (`batch_size`: batch's --batch-size, rows per task handed to a worker). `clusters`: a sandbox per
    Ray mode (`ray`: Ray's defaults; `ray nice N`: workers at nice N), the first one also runs local."""
    from tests.support.ray_sandbox import ADDRESS

    modes = [("local", next(iter(clusters.values())), None)]
    modes += [(kind, sandbox, ADDRESS) for kind, sandbox in clusters.items()]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind, _, _ in modes}
    for round_ in range(rounds):
        for kind, sandbox, address in modes:
            runs[kind].append(per_image(sandbox, bundle, plan, rows, address, batch_size=batch_size))
            last = runs[kind][-1]
            print(f"  {name} round {round_ + 1} {kind}: {last['per_image_s'] * 1000:.1f} ms/image "
                  f"(handing over {last['handoff_s'] * 1000:.2f} ms), start-up {last['startup_s']:.1f} s, "
                  f"load {last['load_1min']:.1f}", flush=True)  # fmt: skip
            print(f"    cores used meanwhile: {cores_line(last['cores'])}", flush=True)

    def median(key: str) -> dict[str, float]:
        return {kind: statistics.median(r[key] for r in results) for kind, results in runs.items()}

    per_image_s = median("per_image_s")
    cores = {
        kind: {k: statistics.median(r["cores"][k] for r in results) for k in KINDS}
        for kind, results in runs.items()
        if all(r["cores"] for r in results)
    }
    overheads = {kind: per_image_s[kind] / per_image_s["local"] - 1 for kind in clusters}
    ratio = overheads["ray"]
    target = TARGETS[name]
    from ilf_deploy.serving.scale.options import BatchOptions

    rows_per_task = BatchOptions(bundle, bundle, bundle, batch_size=batch_size).rows_per_task(rows)
    return {"plan": plan, "rows": rows, "batch_size": batch_size, "rows_per_task": rows_per_task,
            "runs": runs, "per_image_s": per_image_s,
            "startup_s": median("startup_s"), "engine_s": median("engine_s"),
            "handoff_s": median("handoff_s"), "cores": cores, "ray_overhead": ratio,
            "ray_overheads": overheads, "target": target, "met": ratio <= target}  # fmt: skip


def scaling(
    sandbox: Any, bundle: Path, plan: str, rows: int, batch_size: int | None = None
) -> dict[str, Any]:
    from tests.support.ray_sandbox import ADDRESS

    result = {}
    for actors in (1, 2):
        seconds = per_image(sandbox, bundle, plan, rows, ADDRESS, actors, batch_size)["per_image_s"]
        result[str(actors)] = 1 / seconds
        print(f"  tiny, Ray, {actors} actor(s): {result[str(actors)]:.1f} images/s", flush=True)
    return result


def report(results: dict[str, Any]) -> None:
    machine = results["machine"]
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    for name in ("tiny", "pixart-xl"):
        if name in results:
            r = results[name]
            local, ray = (r["per_image_s"][k] * 1000 for k in ("local", "ray"))
            verdict = "met" if r["met"] else "MISSED"
            print(
                f"{name} ({r['plan']}, {r['rows']} rows, {r['rows_per_task']} a task"
                f"{'' if r['batch_size'] else ' (the default)'}): local {local:.1f} ms/image, "
                f"Ray 1 actor {ray:.1f} ms/image: overhead {r['ray_overhead']:+.1%} "
                f"(target <= {r['target']:.0%}: {verdict})"
            )
            engine = {k: v * 1000 for k, v in r["engine_s"].items()}
            handoff = {k: v * 1000 for k, v in r["handoff_s"].items()}
            print(f"  the engine's own time per image (median of the rows): local {engine['local']:.1f} ms, "
                  f"in the Ray actor {engine['ray']:.1f} ms (Ray's processes share these cores); handing "
                  f"rows over (per image minus the engine's mean): local {handoff['local']:.2f} ms (the "
                  f"driver writes each row between images), Ray {handoff['ray']:.2f} ms")  # fmt: skip
            for kind, extra in r.get("ray_overheads", {}).items():
                if kind != "ray":
                    print(f"  {kind}: {r['per_image_s'][kind] * 1000:.1f} ms/image: overhead {extra:+.1%}")
            for kind, used in r["cores"].items():  # beside the engine: what Ray's overhead is made of
                print(f"  cores used, {kind} (medians): {cores_line(used)}")
    scale = results.get("actors_images_per_s")
    if scale is None:
        return
    print(f"tiny, Ray: {scale['1']:.1f} images/s with 1 actor, {scale['2']:.1f} with 2, on "
          f"{machine['cores']} cores (2 cores cannot show scaling: each engine uses them all)")  # fmt: skip


def start_clusters(stack: contextlib.ExitStack, niceness: list[int]) -> dict[str, Any]:
    """A one-node cluster with Ray's defaults (`ray`), and one per worker niceness (`ray nice N`):
    Ray starts its workers at nice 15, so every wake-up of its daemons preempts one of the engine's
    threads and the other waits for it at the next barrier."""
    from ilf_deploy.engines.backends.machine import cpu_count
    from tests.support.ray_sandbox import Sandbox

    clusters = {"ray": stack.enter_context(Sandbox())}
    for nice in niceness:
        clusters[f"ray nice {nice}"] = stack.enter_context(Sandbox(env={"RAY_worker_niceness": str(nice)}))
    for sandbox in clusters.values():
        sandbox.add_node(cpu_count(), head=True)
        sandbox.wait()
    return clusters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 rows, 1 round, no PixArt-XL")
    parser.add_argument("--rows", type=int, default=64, help="rows of the longer tiny batch")
    parser.add_argument("--rounds", type=int, default=2, help="local/Ray pairs per bundle")
    parser.add_argument(
        "--xl-rows", type=int, default=2, help="rows of the longer PixArt-XL batch (~1 min each)"
    )
    parser.add_argument("--xl-bundle", type=Path, help="a PixArt-XL-config bundle (default: backbone's)")
    parser.add_argument("--no-xl", action="store_true", help="skip the PixArt-XL config")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny bundle")
    parser.add_argument(
        "--worker-niceness", type=int, nargs="*", default=[],
        help="also Ray with its workers at these niceness values (RAY_worker_niceness; Ray's is 15), "
        "a cluster each, interleaved with the rest",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, help="batch's --batch-size (rows per task; default: batch's own default)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.no_xl = 32, 1, True
    from ilf_deploy.engines.backends.machine import cpu_count, fingerprint
    from tests.support.ray_sandbox import unavailable

    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"benchmarks.batch needs a Ray sandbox: {reason}")
    results: dict[str, Any] = {"machine": {**fingerprint(), "cores": cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="ilf-bench-") as tmp, contextlib.ExitStack() as stack:
        clusters = start_clusters(stack, args.worker_niceness)
        if not args.no_tiny:
            tiny, size = tiny_bundle(Path(tmp)), args.batch_size
            results["tiny"] = overhead(clusters, "tiny", tiny, "ilf-4", args.rows, args.rounds, size)
            results["actors_images_per_s"] = scaling(clusters["ray"], tiny, "ilf-4", args.rows, size)
        if not args.no_xl:
            xl = xl_bundle(args.xl_bundle)
            results["pixart-xl"] = overhead(
                clusters, "pixart-xl", xl, "ilf-10", args.xl_rows, args.rounds, args.batch_size
            )
    report(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "batch.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(results[n]["met"] for n in TARGETS if n in results) else 1


if __name__ == "__main__":
    sys.exit(main())
