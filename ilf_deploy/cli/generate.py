"""`generate`, from a bundle or a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console, progress
from ilf_deploy.cli.options import BACKEND_HELP, VARIANT_HELP, Digest, Force
from ilf_deploy.cli.paths import image_suffixes, output_file
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import PRESET_HELP
from ilf_deploy.core.runtime.request import RequestContract, RequestError, Size

# -- generate --------------------------------------------------------------------------------


def open_source(
    source: str,
    backend: str | None,
    variant: str | None = None,
    device: str = "cpu",
    digest: str | None = None,
):
    """(generator, plan resolver, architecture) for a bundle or a model directory / hub id."""
    from ilf_deploy.core.runtime.bundle import is_bundle

    if is_bundle(source):
        from ilf_deploy.engines.backends import open_generator
        from ilf_deploy.engines.backends.auto import AUTO

        generator = open_generator(source, backend or AUTO, variant=variant, device=device, digest=digest)
        announce(generator.choice, source, backend)
        from ilf_deploy.engines.backends.plans import resolve_bundle_plan

        bundle = generator.opened_bundle()  # the one open_generator loaded (hashes, pin checked)
        # A bundle's plans carry the schedules of the sizes it was built for.
        resolve = lambda spec, size=None: resolve_bundle_plan(bundle, spec, say)  # noqa: E731
        return generator, resolve, bundle.architecture
    if digest is not None:
        raise ConfigError(f"--digest pins a bundle; {source} is a model (build a bundle of it first)")
    if backend not in (None, "torch"):
        raise ConfigError(
            f"{source} is a model, not a bundle: build one with `ilf-deploy build` for {backend}"
        )
    from ilf_deploy.engines.backends.pytorch import TorchGenerator
    from ilf_deploy.model.loading import load_model

    with console.status("loading model"):
        loaded = load_model(source)
    # (height, width): a schedule that depends on the image size (Flux) is made for the request's.
    resolve = lambda spec, size=None: loaded.resolve_plan(spec, [size] if size else (), say)  # noqa: E731
    return TorchGenerator(loaded, device), resolve, loaded.architecture


def say(line: str) -> None:
    """A one-line note on stderr (`--plan auto`'s choice), printed as is."""
    console.print(line, highlight=False, markup=False)


def announce(choice: str | None, source: str | Path, backend: str | None) -> None:
    """`--backend auto`'s choice, one line on stderr: always when asked for by name, and for the
    default only where the bundle has a tuning.json (without one it is ONNX Runtime fp32, as before)."""
    from ilf_deploy.engines.backends.auto import TUNING_FILE

    if choice and (backend is not None or (Path(source) / TUNING_FILE).is_file()):
        console.print(choice, highlight=False, markup=False)


@command()
def backends(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """The registered engines (--backend), whether this machine can run them, and what installs them."""
    import json

    from ilf_deploy.cli import out
    from ilf_deploy.cli.tables import backends_table
    from ilf_deploy.engines.backends import REGISTRY

    rows = []
    for backend in REGISTRY.values():
        missing = backend.missing()
        rows.append(
            {
                "name": backend.name,
                "summary": backend.summary,
                "installed": missing is None,
                "install": f"pip install 'ilf-deploy[{backend.extra}]'" if backend.extra else "",
                "variants": backend.variants,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    out.print(backends_table(rows))


def request_contract(generator, source: str) -> RequestContract:
    """The limits `serve` and Triton hold requests to, for this bundle or model directory."""
    from ilf_deploy.core.runtime.bundle import is_bundle

    if is_bundle(source):
        return RequestContract.for_bundle(generator.opened_bundle(), generator)
    model = generator.model  # a TorchGenerator: count tokens as its encode_prompt does, untruncated
    tokenizer, max_tokens = model.tokenizer, getattr(model.adapter, "max_sequence_length", 0)
    if tokenizer is None or model.architecture == "dit":
        return RequestContract.for_generator(generator)
    count = lambda text: len(tokenizer(text.lower().strip(), verbose=False).input_ids)  # noqa: E731
    return RequestContract.for_generator(generator, count_tokens=count, max_tokens=max_tokens)


# The request fields' command-line options, named in the contract's one-line errors.
OPTIONS = {"size": "--height/--width", "height": "--height", "width": "--width"}


PLAN_HELP = (
    PRESET_HELP[0].upper() + PRESET_HELP[1:] + "; or auto (the plan `tune --search-plans` chose on "
    "this machine, else the bundle's default plan; ilf-10 for a model). For bundles also a bundled plan."
)
NEGATIVE_HELP = "Negative prompt (PixArt, SD3: the models with classifier-free guidance)."
GUIDANCE_HELP = (
    "Guidance scale (default: the model's: 4.5 PixArt, 4.0 DiT, 7.0 SD3, classifier-free, <=1 "
    "disables it; 3.5 Flux-dev, embedded in the model; Flux-schnell has none)."
)
DEVICE_HELP = "Where the torch backend runs: cpu, cuda, cuda:N (ONNX Runtime: CPU; TensorRT: the GPU)."


@command()
def generate(
    model: Annotated[
        str, typer.Argument(help="A bundle, a diffusers pipeline directory (+ feedback/), or a hub id.")
    ],
    plan: Annotated[
        str,
        typer.Option("--plan", "-p", help=PLAN_HELP),
    ] = "ilf-10",
    prompt: Annotated[str, typer.Option(help="Text prompt (PixArt, SD3, Flux).")] = "",
    negative_prompt: Annotated[str, typer.Option(help=NEGATIVE_HELP)] = "",
    class_label: Annotated[int | None, typer.Option(help="ImageNet class id (DiT).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help=GUIDANCE_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    height: Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")] = None,
    latents_in: Annotated[
        Path | None, typer.Option(help="Start from these latents (.npy) instead of noise.")
    ] = None,
    latents_out: Annotated[Path | None, typer.Option(help="Write the final latents here (.npy).")] = None,
    image_out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the image here (.png).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    variant: Annotated[str | None, typer.Option(help=VARIANT_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    digest: Digest = None,
    force: Force = False,
) -> None:
    """Generate an image by running a step plan (ONNX Runtime for bundles, PyTorch for models).

    The request is held to the limits `serve` and Triton apply (docs/serving.md ("Request limits")): what they
    refuse, this refuses too, in the same words."""
    import numpy as np

    initial = _read_latents(latents_in) if latents_in is not None else None
    output_file(latents_out, "--latents-out", (".npy",), force=force)  # np.save adds .npy to other names
    if image_out is not None or latents_out is None:
        image_out = output_file(image_out or Path("image.png"), "--out", image_suffixes(), force=force)
    generator, resolve, _ = open_source(model, backend, variant, device, digest)
    given = {
        "prompt": prompt or None,
        "negative_prompt": negative_prompt or None,
        "class_label": class_label,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "size": Size(height, width) if height is not None or width is not None else None,
    }
    try:  # plans are the resolver's: a bundled plan by name, a preset or a plan file
        checked = request_contract(generator, model).check({k: v for k, v in given.items() if v is not None})
    except RequestError as exc:
        option = OPTIONS.get(exc.param, "--" + exc.param.replace("_", "-"))
        raise ConfigError(f"{option}: {exc.message}") from None
    request = checked.requests[0]  # resolved: size and guidance are the generator's (Generator.resolve)
    size = (request.height, request.width)
    try:  # the one resolver (backends.plans): bundled plans, auto, plan files, presets
        step_plan = resolve(plan, size)
    except RequestError as exc:
        raise ConfigError(f"--plan: {exc.message}") from None
    with progress() as bar:
        task = bar.add_task(f"{step_plan.name}", total=step_plan.num_steps)
        latents = generator.generate_latents(
            step_plan, request, initial, on_step=lambda _i: bar.advance(task)
        )
    if latents_out is not None:
        # torch tensors (torch on any device, TensorRT on the GPU) come to the host first
        np.save(latents_out, generator.latents_to_numpy(latents))
        console.print(f"latents → {latents_out}")
    if image_out is not None:
        from PIL import Image

        Image.fromarray(generator.decode(latents)[0]).save(image_out)
        console.print(f"image → {image_out}")
    console.print(f"{step_plan.name}: {ran_block_forwards(generator, step_plan)}, seed {seed}")


def ran_block_forwards(generator, plan) -> str:
    """'N block forwards' as they ran (the first image's; an adaptive plan says its most too)."""
    ran = (generator.last_block_forwards or [plan.block_forwards])[0]
    return f"{ran} block forwards" + (f" (at most {plan.block_forwards})" if plan.adaptive else "")


def _read_latents(path: Path):
    import numpy as np

    from ilf_deploy.core.runtime.npy import read_npy

    latents = read_npy(path, "latents").astype(np.float32)  # one line for any bad file (exit 2)
    if not np.isfinite(latents).all():  # NaN or inf would only come out as a garbage image
        raise ConfigError(f"--latents-in {path} holds NaN or infinite values")
    return latents
