"""The reference runner with a baseline plan reproduces diffusers' own pipelines (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline
from diffusers.utils.torch_utils import randn_tensor

from ilf_deploy.core.plan import baseline_plan
from ilf_deploy.engines.backends.pytorch import Request, TorchGenerator

PIPELINES = {"pixart-alpha": PixArtAlphaPipeline, "pixart-sigma": PixArtSigmaPipeline, "dit": DiTPipeline}


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("variant", "steps", "guidance"),
    [
        ("pixart-alpha", 12, 4.5),
        ("pixart-alpha", 10, 1.0),  # no classifier-free guidance
        ("pixart-alpha-1024", 6, 4.5),  # resolution / aspect-ratio conditions
        ("pixart-sigma", 20, 4.5),
    ],
)
def test_pixart_pipeline_parity(tiny_dirs, tiny_models, variant, steps, guidance):
    model = tiny_models[variant]
    pipe = PIPELINES[model.architecture].from_pretrained(tiny_dirs[variant])
    pipe.set_progress_bar_config(disable=True)
    size = model.default_image_size
    latents = torch.randn(
        1,
        4,
        size // model.vae_scale_factor,
        size // model.vae_scale_factor,
        generator=torch.Generator().manual_seed(1),
    )
    prompt, negative = "a small red circle at the top left on a blue background", "blurry"
    expected = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.clone(),
        height=size,
        width=size,
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=model.adapter.max_sequence_length,
    ).images
    plan = baseline_plan(steps, model.adapter.num_blocks, model.scheduler_config)
    request = Request(prompt=prompt, negative_prompt=negative, guidance_scale=guidance)
    got = TorchGenerator(model).generate_latents(plan, request, latents.clone())
    assert got.shape == expected.shape
    assert relative_l2(got, expected) <= 1e-4


@pytest.mark.parametrize(("steps", "guidance"), [(10, 4.0), (12, 1.0)])
def test_dit_pipeline_parity(tiny_dirs, tiny_models, steps, guidance):
    model = tiny_models["dit"]
    pipe = DiTPipeline.from_pretrained(tiny_dirs["dit"])
    pipe.set_progress_bar_config(disable=True)
    decoded: list[torch.Tensor] = []
    original_decode = pipe.vae.decode

    def recording_decode(latents, *args, **kwargs):  # DiTPipeline has no latent output: capture it here
        decoded.append(latents * pipe.vae.config.scaling_factor)
        return original_decode(latents, *args, **kwargs)

    pipe.vae.decode = recording_decode
    pipe(
        class_labels=[3],
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    )
    size = model.adapter.sample_size
    latents = randn_tensor((1, 4, size, size), generator=torch.Generator().manual_seed(5))
    plan = baseline_plan(steps, model.adapter.num_blocks, model.scheduler_config)
    got = TorchGenerator(model).generate_latents(
        plan, Request(class_label=3, guidance_scale=guidance), latents
    )
    assert relative_l2(got, decoded[0]) <= 1e-4
