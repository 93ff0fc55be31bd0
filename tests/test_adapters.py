"""Adapters: the cut forward composes back to the diffusers forward, at any cut."""

from __future__ import annotations

import pytest
import torch

from ilf_deploy.model.ilf import run_blocks

from .conftest import VARIANTS


def adapter_inputs(model, batch: int = 2) -> tuple[torch.Tensor, dict, dict]:
    """Random latents + the adapter's inputs + the matching diffusers forward kwargs."""
    g = torch.Generator().manual_seed(0)
    size = model.adapter.sample_size
    latents = torch.randn(batch, model.adapter.latent_channels, size, size, generator=g)
    if model.architecture == "dit":
        labels = torch.tensor([3, 1000][:batch])
        return latents, {"class_labels": labels}, {"class_labels": labels}
    length, channels = 12, model.text_encoder.config.d_model
    embeds = torch.randn(batch, length, channels, generator=g)
    mask = torch.ones(batch, length)
    mask[0, 5:] = 0  # padding must be masked exactly as diffusers does
    inputs = {"prompt_embeds": embeds, "prompt_mask": mask}
    kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if model.adapter.uses_size_conditions:
        pixels = float(size * model.vae_scale_factor)
        inputs["resolution"] = torch.tensor([[pixels, pixels]] * batch)
        inputs["aspect_ratio"] = torch.tensor([[1.0]] * batch)
        kwargs["added_cond_kwargs"] = {
            "resolution": inputs["resolution"],
            "aspect_ratio": inputs["aspect_ratio"],
        }
    return latents, inputs, kwargs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cuts", [[6], [1, 6], [2, 4, 6], [1, 2, 3, 4, 5, 6]])
def test_segments_compose_to_full_forward(tiny_models, variant, cuts):
    model = tiny_models[variant]
    adapter = model.adapter
    latents, inputs, kwargs = adapter_inputs(model)
    timestep = torch.tensor([637.0, 637.0])
    with torch.no_grad():
        expected = adapter.transformer(latents, timestep=timestep.long(), **kwargs).sample
        cond = adapter.conditioning(torch.tensor([637.0]), adapter.context(inputs))
        state, start = adapter.embed(latents, cond), 0
        for end in cuts:  # segment [start, end)
            state = run_blocks(adapter, start, end - 1, state, cond)
            start = end
        got = adapter.final(state, cond, *latents.shape[-2:])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conditioning_depends_on_timestep(tiny_models, variant):
    adapter = tiny_models[variant].adapter
    _, inputs, _ = adapter_inputs(tiny_models[variant])
    context = adapter.context(inputs)
    a = adapter.conditioning(torch.tensor([900.0]), context)
    b = adapter.conditioning(torch.tensor([500.0]), context)
    assert set(a) == {*adapter.context_outputs, *adapter.time_outputs, *adapter.time_context_inputs}
    assert set(adapter.block_inputs) | set(adapter.final_inputs) <= set(a)
    assert all(not torch.equal(a[k], b[k]) for k in adapter.time_outputs)
    assert all(torch.equal(a[k], b[k]) for k in adapter.context_outputs)


@pytest.mark.parametrize(
    ("variant", "shape"),
    [("pixart-alpha", (8, 8)), ("pixart-alpha", (12, 16)), ("pixart-sigma", (16, 16)), ("dit", (16, 16))],
)
def test_embed_with_explicit_positions_matches_patch_embed(tiny_models, variant, shape):
    adapter = tiny_models[variant].adapter
    latents = torch.randn(2, 4, *shape)
    with torch.no_grad():
        expected = adapter.transformer.pos_embed(latents)
        got = adapter.embed_tokens(latents, adapter.pos_embed(*shape))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["pixart-alpha", "dit"])
def test_feedback_block_is_a_fresh_block_of_the_same_class(tiny_models, variant):
    adapter = tiny_models[variant].adapter
    block = adapter.make_feedback_block()
    reference = adapter.blocks[0]
    assert type(block) is type(reference)
    shapes = {k: v.shape for k, v in block.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    differs = [not torch.equal(v, reference.state_dict()[k]) for k, v in block.state_dict().items()]
    assert any(differs)  # re-initialised, not a copy of block 0
