"""Fast Approximate Distillation: only the feedback learns, the loss falls, training resumes."""

from __future__ import annotations

import torch

from ilf_deploy.ilf import FeedbackModule
from ilf_deploy.loading import load_model
from ilf_deploy.training.feedback import FeedbackTrainConfig, summary, train_feedback


def test_fad_trains_only_the_feedback_and_lowers_the_loss(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["pixart-alpha"])
    before = {k: v.clone() for k, v in model.adapter.transformer.state_dict().items()}
    config = FeedbackTrainConfig(loop=(2, 4), steps=40, batch_size=8, lr=2e-3, pool=64, checkpoint_every=20)
    feedback, state = train_feedback(model, config, tmp_path / "fb")
    after = model.adapter.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone is frozen
    assert torch.count_nonzero(feedback.scales) > 0  # the zero-initialised scales learned
    stats = summary(state, window=10)
    assert stats["steps"] == 40 and stats["loss_last"] < stats["loss_first"]
    loaded = FeedbackModule.load(tmp_path / "fb", model.adapter)
    assert loaded.loop == (2, 4) and torch.equal(loaded.scales, feedback.scales)


def test_fad_resumes_from_its_checkpoint(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["dit"])
    first = FeedbackTrainConfig(loop=(1, 3), steps=10, batch_size=4, pool=16, checkpoint_every=5)
    train_feedback(model, first, tmp_path / "fb")
    longer = FeedbackTrainConfig(loop=(1, 3), steps=14, batch_size=4, pool=16, checkpoint_every=5)
    _, state = train_feedback(model, longer, tmp_path / "fb", resume=True)
    assert state.step == 14 and len(state.losses) == 14  # 10 restored + 4 new
