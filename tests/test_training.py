"""Fast Approximate Distillation on the tiny presets: learns, touches only the feedback, resumes."""

from __future__ import annotations

import random

import pytest
import torch

from ilf_deploy.build.training.common import add_noise, alphas_cumprod
from ilf_deploy.build.training.feedback import (
    FeedbackData,
    FeedbackTrainConfig,
    draw_timesteps,
    plan_timesteps,
    student_forward,
    teacher_forward,
    train_feedback,
)
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import default_loop
from ilf_deploy.model.ilf import FeedbackModule
from ilf_deploy.model.loading import load_model


def _fixed_loss(model, feedback, data, seed: int = 123) -> float:
    """The FAD loss on a fixed batch (same x0, noise, t)."""
    gen = torch.Generator().manual_seed(seed)
    x0, inputs = data.sample(16, gen, 0.0)
    noise = torch.randn(x0.shape, generator=gen)
    cfg = FeedbackTrainConfig(loop=feedback.loop)
    t, tp = draw_timesteps(model, cfg, 16, random.Random(seed))
    ac = alphas_cumprod()
    with torch.no_grad():
        target = teacher_forward(
            model.adapter, add_noise(x0, noise, (t / 2).floor(), ac), (t / 2).floor(), inputs
        )
        pred = student_forward(model.adapter, feedback, add_noise(x0, noise, t, ac), t, tp, inputs)
    return float(((pred - target) ** 2).mean() + ((pred - noise) ** 2).mean())


@pytest.mark.parametrize("name", ["pixart-alpha", "pixart-sigma", "dit"])
def test_fad_lowers_the_loss_and_changes_only_the_feedback(name, tiny_dirs, tmp_path):
    model = load_model(tiny_dirs[name])
    backbone = {k: v.clone() for k, v in model.adapter.transformer.state_dict().items()}
    loop = default_loop(model.adapter.num_blocks)
    config = FeedbackTrainConfig(loop=loop, steps=25, batch_size=8, lr=2e-3, pool=32, caption_dropout=0.0)
    data = FeedbackData(model, config.pool, 0)
    untrained = FeedbackModule.create(model.adapter, loop)  # zero scales: the plain backbone
    before = _fixed_loss(model, untrained, data)
    feedback, state = train_feedback(model, config, tmp_path / "fb", data=data)
    after = _fixed_loss(model, feedback, data)
    assert after < before, (before, after)
    assert state.step == 25 and len(state.losses) == 25
    assert feedback.scales.abs().sum() > 0  # the zero-initialised scales learned
    for key, value in model.adapter.transformer.state_dict().items():
        assert torch.equal(value, backbone[key]), key  # bit-identical backbone
    loaded = FeedbackModule.load(tmp_path / "fb", model.adapter)
    assert loaded.loop == loop and torch.equal(loaded.scales, feedback.scales)


def test_checkpoint_resume_equals_one_run(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["pixart-alpha"])
    loop = default_loop(model.adapter.num_blocks)

    def cfg(steps: int) -> FeedbackTrainConfig:
        return FeedbackTrainConfig(loop=loop, steps=steps, batch_size=4, lr=1e-3, pool=16, checkpoint_every=3)

    data = FeedbackData(model, 16, 0)
    full, full_state = train_feedback(model, cfg(6), tmp_path / "full", data=data)
    train_feedback(model, cfg(3), tmp_path / "part", data=data)
    resumed, state = train_feedback(model, cfg(6), tmp_path / "part", resume=True, data=data)
    assert state.step == 6 and state.losses[:3] == full_state.losses[:3]
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train_feedback(model, cfg(6), tmp_path / "none", resume=True, data=data)


def test_training_timesteps_follow_the_plan_rule(tiny_models):
    model = tiny_models["pixart-alpha"]
    loop = default_loop(model.adapter.num_blocks)
    config = FeedbackTrainConfig(loop=loop)
    table = plan_timesteps(model, config)
    assert len(table) == 8  # first 2 + last 2 feedback steps of ilf-10 and of ilf-12
    n, m = model.adapter.num_blocks, loop[1] - loop[0] + 1
    for t, tp, gap in table:
        assert tp == pytest.approx(max(t - gap * n / m, 0.0), abs=1e-3)
    t, tp = draw_timesteps(model, config, 64, random.Random(0))
    assert torch.all(tp <= t) and torch.all(tp >= 0) and torch.all(t < 1000)
    with pytest.raises(ConfigError, match="out of range"):
        FeedbackTrainConfig(loop=(0, 99)).validate(model.adapter.num_blocks)


def test_device_is_checked_before_training(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    loop = default_loop(6)
    with pytest.raises(ConfigError, match="unknown device"):
        FeedbackTrainConfig(loop=loop, device="tpu7").validate(6)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            FeedbackTrainConfig(loop=loop, device="cuda").validate(6)
    result = CliRunner().invoke(
        app, ["train-feedback", str(tiny_dirs["pixart-alpha"]), "--device", "tpu7", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_interrupted_run_resumes_from_the_cli(tiny_dirs, tmp_path):
    """The default --out is MODEL/feedback: after an interruption it holds only the checkpoint."""
    import shutil

    from typer.testing import CliRunner

    from ilf_deploy.cli import app
    from ilf_deploy.model.ilf import CONFIG_FILE

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["pixart-alpha"], model)
    args = ["train-feedback", str(model), "--batch-size", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--force"])  # make-tiny's random feedback
    assert result.exit_code == 0, result.output
    for leftover in (model / "feedback").iterdir():  # what a run killed after its first checkpoint leaves
        if leftover.name != "fad_checkpoint.pt":
            leftover.unlink()
    result = CliRunner().invoke(app, ["generate", str(model), "--plan", "ilf-4", "--prompt", "x"])
    assert result.exit_code == 2 and "--resume" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--steps", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert (model / "feedback" / CONFIG_FILE).is_file()
    assert load_model(model).feedback is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (never run in this project's CI)")
def test_fad_on_cuda_matches_cpu(tiny_dirs, tmp_path):
    """Same random stream on either device: the first losses agree to float tolerance."""
    runs = {}
    for device in ("cpu", "cuda"):
        model = load_model(tiny_dirs["pixart-alpha"])
        config = FeedbackTrainConfig(loop=default_loop(6), steps=3, batch_size=4, pool=16, device=device)
        feedback, state = train_feedback(model, config, tmp_path / device)
        runs[device] = state.losses
        saved = FeedbackModule.load(tmp_path / device, load_model(tiny_dirs["pixart-alpha"]).adapter)
        assert torch.equal(saved.scales, feedback.scales.cpu())
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=1e-3)


def test_guided_fad_distils_the_guided_output(tiny_dirs, tmp_path):
    """guidance > 1 trains on cond and null captions together: learns, and differs from plain FAD."""
    model = load_model(tiny_dirs["pixart-alpha"])
    loop = default_loop(model.adapter.num_blocks)
    base = FeedbackTrainConfig(loop=loop, steps=3, batch_size=4, pool=16)
    with pytest.raises(ConfigError, match="guidance"):
        FeedbackTrainConfig(loop=loop, guidance=-1.0).validate(model.adapter.num_blocks)
    data = FeedbackData(model, base.pool, 0)
    null = data.unconditional(data.sample(4, torch.Generator().manual_seed(0), 0.0)[1])
    assert torch.equal(null["prompt_embeds"][0], null["prompt_embeds"][3])  # every row the null caption
    _, plain_state = train_feedback(model, base, tmp_path / "plain", data=data)
    config = FeedbackTrainConfig(loop=loop, steps=3, batch_size=4, pool=16, guidance=4.5)
    guided, state = train_feedback(model, config, tmp_path / "guided", data=data)
    assert state.step == 3 and all(torch.isfinite(torch.tensor(state.losses)))
    assert state.losses != plain_state.losses
    assert guided.scales.abs().sum() > 0
