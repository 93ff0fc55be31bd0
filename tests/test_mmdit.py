"""Two-stream MMDiTs (SD3, Flux.1 dev and schnell) on the reference runner: diffusers' own
pipelines reproduced at two resolutions, every plan kind, and ILF over image and text streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.engines.backends.pytorch import Request, TorchGenerator
from ilf_deploy.model.adapters.mmdit import pack, unpack
from ilf_deploy.model.ilf import FeedbackModule, inner_loop, run_blocks
from ilf_deploy.model.loading import load_model

from .conftest import MMDIT_FAMILIES as FAMILIES

PROMPT = "a small red circle at the top left on a blue background"
SIZE = 32  # the tiny models' image size (FluxPipeline's own default is 1024 px whatever the model)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def diffusers_latents(model, latents: np.ndarray, steps: int, size: tuple[int, int], guidance: float):
    """The family's own diffusers pipeline from the same latents, in (B, C, h, w)."""
    pipe = model.text_pipeline
    start = torch.from_numpy(latents)
    flux = model.architecture == "flux"
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=pack(start) if flux else start,  # FluxPipeline takes its packed layout
        height=size[0],
        width=size[1],
        output_type="latent",
    ).images
    return unpack(out, *latents.shape[-2:]) if flux else out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", [1, 2])
@torch.no_grad()
def test_reference_runner_matches_the_diffusers_pipeline(mmdit_models, family, scale):
    """base-N from the same latents and prompt: ≤ 1e-4 relative L2 at two sizes (Flux-dev: two
    token counts, so two dynamic shifts)."""
    model = mmdit_models[family]
    hw = (SIZE * scale, SIZE)  # the second size not square
    generator = TorchGenerator(model)
    request = generator.resolve(Request(prompt=PROMPT, seed=11, height=hw[0], width=hw[1]))
    latents = generator.initial_latents(request)
    plan = model.resolve_plan("base-4", [hw])
    got = generator.generate_latents(plan, request, latents)
    expected = diffusers_latents(model, latents, 4, hw, request.guidance_scale)
    assert got.shape == expected.shape
    assert relative_l2(got, expected) <= 1e-4


def test_flux_dev_plans_carry_one_schedule_per_size(mmdit_models):
    model = mmdit_models["flux"]
    size = SIZE
    plan = model.resolve_plan("ilf-4", [(size, size), (2 * size, 2 * size)])
    small, large = (model.image_tokens(s, s) for s in (size, 2 * size))
    assert set(plan.schedules) == {small, large} and plan.version == 3
    a, b = plan.for_image_tokens(small), plan.for_image_tokens(large)
    assert [s.timestep for s in a.steps] != [s.timestep for s in b.steps]  # a larger image: more shift
    assert a.steps[0].ops == b.steps[0].ops
    from ilf_deploy.core.plan import StepPlan

    assert StepPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ConfigError, match="was made for images of"):
        plan.for_image_tokens(small + 1)
    # schnell and SD3 have one schedule whatever the size
    assert not mmdit_models["flux-schnell"].resolve_plan("base-4").schedules


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["ilf-4", "cache-6", "base-4"])
@torch.no_grad()
def test_every_plan_kind_generates(mmdit_models, family, spec):
    model = mmdit_models[family]
    generator = TorchGenerator(model)
    plan = model.resolve_plan(spec, [(SIZE, SIZE)])
    latents = generator.generate_latents(plan, Request(prompt=PROMPT, seed=1, height=SIZE, width=SIZE))
    assert torch.isfinite(latents).all()
    assert generator.last_block_forwards == [plan.block_forwards]
    image = generator.decode(latents)
    assert image.shape == (1, SIZE, SIZE, 3) and image.std() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("spec", ["ilf-6-cache1-4r2", "ilf-6-adapt1-4t0.3m2"])
@torch.no_grad()
def test_composed_and_adaptive_plans_batch_as_each_image_alone(mmdit_models, family, spec):
    """A Δ per state tensor: a batch of two prompts gives each image what it gets alone."""
    model = mmdit_models[family]
    generator = TorchGenerator(model)
    plan = model.resolve_plan(spec, [(SIZE, SIZE)])
    requests = [
        Request(prompt=p, seed=s, height=SIZE, width=SIZE) for p, s in ((PROMPT, 1), ("a green square", 2))
    ]
    batch = generator.generate_batch(plan, requests)
    ran = list(generator.last_block_forwards)
    assert all(n < model.adapter.num_blocks * 6 + 2 * 7 for n in ran)  # the cache skipped blocks
    for i, request in enumerate(requests):
        alone = generator.generate_latents(plan, request)
        assert generator.last_block_forwards == [ran[i]]
        assert relative_l2(batch[i : i + 1], alone) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_zero_feedback_is_the_plain_forward_on_both_streams(mmdit_models, family):
    """ILF on an MMDiT: zero scales and t_post = t change nothing, on image and text tokens."""
    model = mmdit_models[family]
    adapter = model.adapter
    feedback = FeedbackModule.create(adapter, model.feedback.loop)
    generator = TorchGenerator(model)
    request = generator.resolve(Request(prompt=PROMPT, height=SIZE, width=SIZE))
    latents = torch.from_numpy(generator.initial_latents(request))
    inputs = generator.batch_inputs([request], False, tuple(latents.shape[-2:]))
    cond = adapter.conditioning(torch.tensor([700.0]), adapter.context(inputs))
    state = run_blocks(adapter, 0, feedback.loop[0] - 1, adapter.embed(latents, cond), cond)
    plain = run_blocks(adapter, *feedback.loop, state, cond)
    looped = inner_loop(adapter, feedback, state, cond, cond)
    assert set(looped) == {"hidden", "text"}
    for name in looped:
        torch.testing.assert_close(looped[name], plain[name], rtol=0, atol=1e-6)
    # with non-zero scales the feedback reaches both streams
    torch.nn.init.normal_(feedback.scales, std=0.5)
    fed = inner_loop(adapter, feedback, state, cond, cond)
    assert not torch.allclose(fed["hidden"], plain["hidden"])


def test_flux_feedback_block_takes_the_class_that_ends_the_loop(mmdit_models):
    adapter = mmdit_models["flux"].adapter
    double, last = adapter.num_double_blocks, adapter.num_blocks - 1
    assert type(adapter.make_feedback_block(0)) is type(adapter.blocks[0])
    assert type(adapter.make_feedback_block(last)) is type(adapter.blocks[last])
    assert type(adapter.blocks[0]) is not type(adapter.blocks[last]) and 0 < double <= last


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fad_training_lowers_the_loss_on_the_flow_families(mmdit_dirs, family, tmp_path):
    """Fast Approximate Distillation with rectified-flow noising (velocity targets) on both streams;
    the backbone stays bit-identical."""
    fad_lowers_the_loss(load_model(mmdit_dirs[family]), tmp_path, image_size=SIZE)


def fad_lowers_the_loss(model, tmp_path, image_size: int | None = None) -> None:
    """20 FAD steps lower the loss on a fixed batch, and leave the backbone bit-identical (every flow
    family: SD3, Flux here, Sana in test_sana.py)."""
    import random

    from ilf_deploy.build.training.common import NoiseSchedule
    from ilf_deploy.build.training.feedback import (
        FeedbackData,
        FeedbackTrainConfig,
        draw_timesteps,
        fad_loss,
        train_feedback,
    )

    backbone = {k: v.clone() for k, v in model.adapter.transformer.state_dict().items()}
    loop = model.feedback.loop
    config = FeedbackTrainConfig(
        loop=loop, steps=20, batch_size=8, lr=3e-3, pool=16, caption_dropout=0.0, image_size=image_size
    )
    data = FeedbackData(model, config.pool, 0, size=image_size)  # None: the model's default size
    schedule = NoiseSchedule(None)

    def fixed_loss(feedback) -> float:
        gen = torch.Generator().manual_seed(123)
        x0, inputs = data.sample(8, gen, 0.0)
        noise = torch.randn(x0.shape, generator=gen)
        t, tp = draw_timesteps(model, config, 8, random.Random(123))
        with torch.no_grad():
            return float(
                fad_loss(model.adapter, feedback, config, data, (x0, noise, inputs), (t, tp), schedule)[0]
            )

    before = fixed_loss(FeedbackModule.create(model.adapter, loop))
    feedback, state = train_feedback(model, config, tmp_path / "fb", data=data)
    assert np.isfinite(before) and fixed_loss(feedback) < before
    assert state.step == 20 and feedback.scales.abs().sum() > 0
    for key, value in model.adapter.transformer.state_dict().items():
        assert torch.equal(value, backbone[key]), key
