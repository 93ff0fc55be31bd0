"""ILF semantics (paper eqs. 2–5) and the feedback module's persistence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ilf_deploy.core.errors import ConfigError, ModelLoadError
from ilf_deploy.core.plan import validate_loop
from ilf_deploy.model.ilf import FeedbackModule, inner_loop, run_blocks

from .test_adapters import adapter_inputs


def ilf_forward(adapter, feedback, latents, inputs, t, t_post):
    """embed -> pre-loop -> inner loop with feedback -> post-loop at t_post -> final at t_post."""
    context = adapter.context(inputs)
    cond = adapter.conditioning(torch.tensor([t]), context)
    cond_post = adapter.conditioning(torch.tensor([t_post]), context)
    start, end = feedback.loop
    hidden = run_blocks(adapter, 0, start - 1, adapter.embed(latents, cond), cond)
    hidden = inner_loop(adapter, feedback, hidden, cond, cond_post)
    hidden = run_blocks(adapter, end + 1, adapter.num_blocks - 1, hidden, cond_post)
    return adapter.final(hidden, cond_post, *latents.shape[-2:])


@pytest.mark.parametrize("variant", ["pixart-alpha", "pixart-sigma", "dit"])
@torch.no_grad()
def test_zero_scales_and_t_post_equal_t_is_the_baseline_forward(tiny_models, variant):
    model = tiny_models[variant]
    adapter = model.adapter
    feedback = FeedbackModule.create(adapter, (2, 4))
    assert torch.count_nonzero(feedback.scales) == 0  # zero-initialised, as the paper says
    latents, inputs, _ = adapter_inputs(model)
    baseline = adapter.forward(latents, torch.tensor([700.0]), inputs)
    got = ilf_forward(adapter, feedback, latents, inputs, 700.0, 700.0)
    torch.testing.assert_close(got, baseline, rtol=0, atol=1e-6)


@torch.no_grad()
def test_inner_loop_matches_equations_2_and_3(tiny_models):
    model = tiny_models["pixart-alpha"]
    adapter, feedback = model.adapter, model.feedback
    start, end = feedback.loop
    latents, inputs, _ = adapter_inputs(model)
    context = adapter.context(inputs)
    cond = adapter.conditioning(torch.tensor([800.0]), context)
    cond_post = adapter.conditioning(torch.tensor([600.0]), context)
    h_in = adapter.embed(latents, cond)["hidden"]
    # By hand: first pass at t, feedback reads f_{e,t}, second pass adds s_i * f_feed at t_post.
    f_e = h_in
    for i in range(start, end + 1):
        f_e = adapter.blocks[i](
            f_e,
            encoder_hidden_states=cond["context"],
            encoder_attention_mask=cond["context_bias"],
            timestep=cond["temb"],
        )
    f_feed = feedback.block(
        f_e,
        encoder_hidden_states=cond["context"],
        encoder_attention_mask=cond["context_bias"],
        timestep=cond["temb"],
    )
    h = h_in
    for j, i in enumerate(range(start, end + 1)):
        h = adapter.blocks[i](
            h + feedback.scales[j] * f_feed,
            encoder_hidden_states=cond_post["context"],
            encoder_attention_mask=cond_post["context_bias"],
            timestep=cond_post["temb"],
        )
    got = inner_loop(adapter, feedback, {"hidden": h_in}, cond, cond_post)
    torch.testing.assert_close(got["hidden"], h, rtol=0, atol=0)


@torch.no_grad()
def test_scales_and_t_post_both_matter(tiny_models):
    model = tiny_models["dit"]
    adapter, feedback = model.adapter, model.feedback
    latents, inputs, _ = adapter_inputs(model)
    with_feedback = ilf_forward(adapter, feedback, latents, inputs, 700.0, 700.0)
    baseline = adapter.forward(latents, torch.tensor([700.0]), inputs)
    assert (with_feedback - baseline).abs().max() > 1e-4
    shifted = ilf_forward(adapter, feedback, latents, inputs, 700.0, 500.0)
    assert (shifted - with_feedback).abs().max() > 1e-4


def test_save_load_round_trip(tiny_models, tmp_path):
    adapter = tiny_models["pixart-sigma"].adapter
    module = FeedbackModule.create(adapter, (1, 3))
    torch.nn.init.normal_(module.scales)
    module.save(tmp_path / "fb")
    assert sorted(p.name for p in (tmp_path / "fb").iterdir()) == ["feedback.safetensors", "ilf_config.json"]
    # readable like any written file (safetensors alone writes 0600): bundles copy it, servers read it
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "fb").iterdir()}
    assert modes["feedback.safetensors"] == modes["ilf_config.json"], modes
    loaded = FeedbackModule.load(tmp_path / "fb", adapter)
    assert loaded.loop == (1, 3) and loaded.config.t_post == "rescale"
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_feedback_remembers_its_t_post_rule(tiny_models, tmp_path):
    """ilf-N presets run a feedback with the t_post rule it was trained for; old files mean rescale."""
    import json

    model = tiny_models["pixart-alpha"]
    FeedbackModule.create(model.adapter, (1, 3), t_post="uniform").save(tmp_path / "fb")
    loaded = FeedbackModule.load(tmp_path / "fb", model.adapter)
    assert loaded.config.t_post == "uniform"
    with_feedback = dataclasses.replace(model, feedback=loaded)
    plan = with_feedback.resolve_plan("ilf-10")
    step = plan.steps[0]
    assert plan.loop == (1, 3) and step.t_post == pytest.approx(
        step.timestep - 0.5 * (step.timestep - step.coefficients.prev_timestep)
    )
    config = json.loads((tmp_path / "fb" / "ilf_config.json").read_text())
    del config["t_post"]  # as written before the field existed
    (tmp_path / "fb" / "ilf_config.json").write_text(json.dumps(config))
    assert FeedbackModule.load(tmp_path / "fb", model.adapter).config.t_post == "rescale"


def test_load_refuses_a_feedback_for_another_depth(tiny_models, tmp_path):
    module = FeedbackModule.create(tiny_models["dit"].adapter, (1, 3))
    module.save(tmp_path / "fb")
    deeper = tiny_models["dit"].adapter
    deeper.transformer.transformer_blocks.append(deeper.blocks[0])
    try:
        with pytest.raises(ModelLoadError, match="6-block"):
            FeedbackModule.load(tmp_path / "fb", deeper)
    finally:
        del deeper.transformer.transformer_blocks[-1]
    with pytest.raises(ModelLoadError, match="no ILF feedback config"):
        FeedbackModule.load(tmp_path / "missing", deeper)


def test_learnable_parameters_are_only_feedback_and_scales(tiny_models):
    model = tiny_models["pixart-alpha"]
    block_params = sum(p.numel() for p in model.adapter.blocks[0].parameters())
    assert (
        sum(p.numel() for p in model.feedback.parameters()) == block_params + model.feedback.config.loop_size
    )


@pytest.mark.parametrize(("loop", "message"), [((0, 6), "out of range"), ((4, 2), "starts after")])
def test_loop_validation(loop, message):
    with pytest.raises(ConfigError, match=message):
        validate_loop(*loop, 6)
