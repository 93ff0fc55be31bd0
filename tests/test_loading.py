"""Model loading: pipeline dirs, transformer dirs, hub ids (up to the network call), bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from ilf_deploy.core.errors import ModelLoadError
from ilf_deploy.model import loading
from ilf_deploy.model.loading import detect_architecture, load_model


def test_pipeline_dir_loads_every_part(tiny_models):
    model = tiny_models["pixart-sigma"]
    assert model.architecture == "pixart-sigma"
    assert model.adapter.max_sequence_length == 300
    assert model.tokenizer is not None and model.text_encoder is not None and model.vae is not None
    assert (
        model.feedback is not None and model.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    )
    dit = tiny_models["dit"]
    assert dit.scheduler_config["_class_name"] == "DDIMScheduler" and dit.extras["id2label"]


def test_transformer_dir_loads_without_pipeline_parts(tiny_dirs):
    model = load_model(tiny_dirs["dit"] / "transformer")
    assert model.architecture == "dit" and model.vae is None and model.feedback is None
    assert model.adapter.num_blocks == 6


def test_hub_id_goes_through_snapshot_download(tiny_dirs, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tiny_dirs["dit"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("facebook/DiT-XL-2-256")
    assert calls == [("facebook/DiT-XL-2-256", loading.HUB_PATTERNS)]
    assert model.architecture == "dit"


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not fetch 'PixArt-alpha/PixArt-XL-2-512x512'"):
        load_model("PixArt-alpha/PixArt-XL-2-512x512")


def test_missing_dir_and_unknown_architecture(tmp_path, tiny_dirs):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a diffusers directory"):
        load_model(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "file.txt")
    copy = tmp_path / "sd"
    shutil.copytree(tiny_dirs["dit"], copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        detect_architecture(copy)


def test_corrupt_weights_give_a_clear_error(tmp_path, tiny_dirs):
    copy = tmp_path / "broken"
    shutil.copytree(tiny_dirs["pixart-alpha"], copy)
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot load the transformer"):
        load_model(copy)


def test_torch_device_names_are_checked():
    import torch

    from ilf_deploy.core.errors import ConfigError
    from ilf_deploy.model.loading import torch_device

    assert torch_device("cpu") == torch.device("cpu")
    for name, message in (("gpu0", "unknown device"), ("meta", "only cpu and cuda")):
        with pytest.raises(ConfigError, match=message):
            torch_device(name)
    # No GPU: "sees no CUDA GPU"; a GPU machine (make gpu-check): the ordinal is out of range.
    with pytest.raises(ConfigError, match=r"no CUDA GPU|CUDA GPU\(s\)"):
        torch_device("cuda:99")
