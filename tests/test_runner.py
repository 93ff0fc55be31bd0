"""The reference runner executes every kind of plan; ILF and Δ-cache behave as specified."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import (
    baseline_plan,
    block_caching_plan,
    cache_plan,
    delta_dit_plan,
    ilf_plan,
    resolve_plan,
)
from ilf_deploy.engines.backends.pytorch import Request, TorchGenerator, TorchSegments, profile_block_changes
from ilf_deploy.model.ilf import FeedbackModule

PROMPT = Request(prompt="a green square on a white background", guidance_scale=4.5, seed=3)


def run(model, plan, request=PROMPT):
    return TorchGenerator(model).generate_latents(plan, request)


def test_cache_refreshed_every_step_is_the_baseline(tiny_models):
    model = tiny_models["pixart-alpha"]
    n = model.adapter.num_blocks
    base = run(model, baseline_plan(8, n, model.scheduler_config))
    always = run(model, cache_plan(8, n, (1, 4), 1, model.scheduler_config))
    torch.testing.assert_close(always, base, rtol=1e-5, atol=1e-5)
    reused = run(model, cache_plan(8, n, (1, 4), 3, model.scheduler_config))
    assert torch.isfinite(reused).all()
    assert (reused - base).norm() / base.norm() > 1e-4  # the reused Δ really replaces compute


def test_ilf_plan_with_zero_scales_and_no_t_post_is_the_baseline(tiny_models):
    model = tiny_models["dit"]
    n = model.adapter.num_blocks
    request = Request(class_label=2, guidance_scale=4.0, seed=1)
    base = run(model, baseline_plan(6, n, model.scheduler_config), request)
    silent = FeedbackModule.create(model.adapter, model.feedback.loop)
    generator = TorchGenerator(model)
    generator.segments = TorchSegments(model.adapter, silent)
    plan = ilf_plan(6, n, model.feedback.loop, "all", "none", model.scheduler_config)
    torch.testing.assert_close(generator.generate_latents(plan, request), base, rtol=1e-5, atol=1e-5)
    trained = run(
        model, ilf_plan(6, n, model.feedback.loop, "all", "rescale", model.scheduler_config), request
    )
    assert (trained - base).norm() / base.norm() > 1e-4


@pytest.mark.parametrize("variant", ["pixart-alpha", "pixart-alpha-1024", "pixart-sigma", "dit"])
def test_presets_run_on_every_architecture(tiny_models, variant):
    model = tiny_models[variant]
    request = Request(prompt="a cat", class_label=1, guidance_scale=3.0)
    for name in ("ilf-4", "cache-6"):
        plan = resolve_plan(name, model.adapter.num_blocks, model.scheduler_config, model.feedback.loop)
        latents = run(model, plan, request)
        assert latents.shape[1] == model.adapter.latent_channels and torch.isfinite(latents).all()


def test_delta_dit_and_block_caching_plans_run(tiny_models):
    model = tiny_models["pixart-sigma"]
    n = model.adapter.num_blocks
    assert torch.isfinite(run(model, delta_dit_plan(6, n, 4, 3, 2, model.scheduler_config))).all()
    profile_plan = baseline_plan(6, n, model.scheduler_config)
    requests = [Request(prompt="a red circle", seed=0), Request(prompt="a blue star", seed=1)]
    changes = profile_block_changes(TorchGenerator(model), profile_plan, requests)
    assert changes.shape == (6, n) and (changes[1:] > 0).all() and (changes[0] == 0).all()
    plan = block_caching_plan(
        changes, delta=float(changes[1:].mean()), scheduler_config=model.scheduler_config
    )
    assert plan.block_forwards < profile_plan.block_forwards
    assert torch.isfinite(run(model, plan)).all()


def test_plan_model_mismatches_are_refused(tiny_models, tiny_dirs):
    model = tiny_models["pixart-alpha"]
    with pytest.raises(ConfigError, match="blocks"):
        run(model, baseline_plan(4, 28))
    with pytest.raises(ConfigError, match="trained for"):
        run(model, ilf_plan(4, model.adapter.num_blocks, (0, 1), "all"))
    generator = TorchGenerator(model)
    generator.segments = TorchSegments(model.adapter, None)
    with pytest.raises(ConfigError, match="no feedback module"):
        generator.generate_latents(ilf_plan(4, model.adapter.num_blocks, model.feedback.loop), PROMPT)


def test_request_validation(tiny_models):
    dit = tiny_models["dit"]
    plan = baseline_plan(2, dit.adapter.num_blocks, dit.scheduler_config)
    with pytest.raises(ConfigError, match="class-label"):
        run(dit, plan, Request())
    with pytest.raises(ConfigError, match="class label must be"):
        run(dit, plan, Request(class_label=1000))
    pixart = tiny_models["pixart-alpha"]
    with pytest.raises(ConfigError, match="multiples"):
        run(pixart, baseline_plan(2, pixart.adapter.num_blocks), Request(prompt="x", height=30, width=32))
    with pytest.raises(ConfigError, match="shape"):
        TorchGenerator(pixart).generate_latents(baseline_plan(2, 6), PROMPT, torch.zeros(1, 4, 3, 3))


def test_decode_gives_uint8_images(tiny_models):
    model = tiny_models["pixart-alpha"]
    generator = TorchGenerator(model)
    images = generator.decode(generator.initial_latents(PROMPT))
    assert images.dtype.name == "uint8" and images.shape == (1, 32, 32, 3)


def test_runtime_loop_imports_no_diffusers_or_transformers():
    code = (
        "import sys, ilf_deploy.core.runtime.loop, ilf_deploy.core.plan\n"
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_torch_generator_refuses_unknown_or_missing_devices(tiny_dirs):
    from ilf_deploy.model.loading import load_model

    model = load_model(tiny_dirs["pixart-alpha"])
    with pytest.raises(ConfigError, match="unknown device"):
        TorchGenerator(model, "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            TorchGenerator(model, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (never run in this project's CI)")
@pytest.mark.parametrize("variant", ["pixart-alpha", "pixart-sigma", "dit"])
def test_torch_generator_on_cuda_matches_cpu(tiny_dirs, variant):
    """Same seeded noise, same plan: CUDA and CPU latents agree to float tolerance, images decode."""
    from ilf_deploy.model.loading import load_model

    request = Request(prompt="a red circle", class_label=1, guidance_scale=3.0, seed=5)
    out = {}
    for device in ("cpu", "cuda"):
        model = load_model(tiny_dirs[variant])  # each device its own copy: TorchGenerator moves it
        generator = TorchGenerator(model, device)
        for name in ("ilf-4", "cache-6"):
            plan = resolve_plan(name, model.adapter.num_blocks, model.scheduler_config, model.feedback.loop)
            latents = generator.generate_batch(plan, [request, Request(**{**request.__dict__, "seed": 6})])
            assert latents.device.type == device
            out[device, name] = latents.cpu()
        if model.vae is not None:
            assert generator.decode(latents).dtype.name == "uint8"
    for name in ("ilf-4", "cache-6"):
        torch.testing.assert_close(out["cuda", name], out["cpu", name], rtol=1e-3, atol=1e-3)
