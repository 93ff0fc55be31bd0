"""`ilf-deploy train-base`: every stage end to end at toy sizes, resumable, one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ilf_deploy.build.training.common import load_checkpoint
from ilf_deploy.build.training.recipe import RECIPE
from ilf_deploy.cli import app
from ilf_deploy.model.loading import load_model

runner = CliRunner()


def test_train_base_writes_a_loadable_pipeline_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "model"
    toy = ["--vae-steps", "2", "--latents", "8", "--steps", "2", "--batch-size", "2"]
    result = runner.invoke(app, ["train-base", "all", "--work", str(work), "--out", str(out), *toy])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.architecture == "pixart-alpha" and model.default_image_size == 64
    facts = json.loads((out / "training.json").read_text())
    assert facts["steps"] == 2 and facts["vae_steps_done"] == 2
    assert facts["recipe"]["latents"] == 8 and facts["recipe"]["vae_batch"] == RECIPE.vae_batch
    # A longer run resumes from the checkpoint: two more steps, not four from scratch.
    toy[toy.index("--steps") + 1] = "4"
    result = runner.invoke(app, ["train-base", "transformer", "--work", str(work), *toy])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(work / "transformer.pt")["step"] == 4
    assert (work / "train.log").read_text().count("transformer step 0 ") == 1  # not restarted


def test_train_base_bad_input_is_one_line(tmp_path):
    for args, fragment in (
        (["train-base", "nope", "--work", str(tmp_path)], "unknown stage"),
        (["train-base", "vae", "--work", str(tmp_path), "--vae-steps", "0"], "--vae-steps"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and fragment in result.output
