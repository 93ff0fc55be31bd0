"""Tiny random pipelines load with the real diffusers `from_pretrained` and run offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.tiny import TINY_ARCHITECTURES, TINY_IMAGE_SIZE, make_tiny_pipeline, tiny_image_size
from ilf_deploy.model.tokenizer import DEFAULT_VOCAB, build_word_tokenizer, save_tokenizer_dir

EOS_ID, PAD_ID, UNK_ID = 1, 0, 2


def _diffusers_call(tok, prompts: list[str], max_length: int):
    # exactly how PixArt pipelines call the T5 tokenizer
    return tok(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )


def test_tokenizer_t5_like(tmp_path: Path) -> None:
    assert {"circle", "top", "astronaut", "background", "7"} <= set(DEFAULT_VOCAB)
    tok_dir = save_tokenizer_dir(build_word_tokenizer(), tmp_path / "tok", model_max_length=16)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert (hf.pad_token, hf.eos_token, hf.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.model_max_length) == (
        PAD_ID,
        EOS_ID,
        UNK_ID,
        16,
    )

    prompts = ["A RED circle, top left", "a xyzzy on the zork", "", " ".join(["cat"] * 40)]
    enc = _diffusers_call(hf, prompts, 16)
    ids, mask = enc.input_ids.tolist(), enc.attention_mask.tolist()
    assert ids[0][:6] == [hf.convert_tokens_to_ids(w) for w in ["a", "red", "circle", ",", "top", "left"]]
    assert ids[0][6:] == [EOS_ID] + [PAD_ID] * 9 and mask[0] == [1] * 7 + [0] * 9
    assert ids[1][:6] == [
        hf.convert_tokens_to_ids("a"),
        UNK_ID,
        hf.convert_tokens_to_ids("on"),
        hf.convert_tokens_to_ids("the"),
        UNK_ID,
        EOS_ID,
    ]
    assert ids[2] == [EOS_ID] + [PAD_ID] * 15  # the empty negative prompt, as with T5
    assert ids[3][-1] == EOS_ID and sum(mask[3]) == 16  # truncation keeps the trailing </s>

    # the raw tokenizers library, padded/truncated the same way, agrees with transformers
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.enable_truncation(16)
    raw.enable_padding(pad_id=PAD_ID, pad_token="<pad>", length=16)
    raw_enc = raw.encode_batch(prompts)
    assert [e.ids for e in raw_enc] == ids and [e.attention_mask for e in raw_enc] == mask


def _latent_shape(arch: str, resolution_conditions: bool) -> tuple[int, ...]:
    side = tiny_image_size(arch, resolution_conditions=resolution_conditions) // 4
    return (1, 4, side, side)


@pytest.mark.parametrize(
    ("arch", "resolution_conditions"),
    [("pixart-alpha", False), ("pixart-sigma", False), ("dit", False), ("pixart-alpha", True)],
)
def test_tiny_pipeline_runs(tmp_path: Path, arch: str, resolution_conditions: bool) -> None:
    from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

    path = make_tiny_pipeline(arch, tmp_path / "pipe", resolution_conditions=resolution_conditions)
    assert path == tmp_path / "pipe" and [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp dir left
    gen = torch.Generator().manual_seed(0)
    if arch == "dit":
        pipe = DiTPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.get_label_ids(["goldfish"]) == [1]
        # DiTPipeline always VAE-decodes (it ignores output_type="latent"): capture the latents it decodes.
        seen: list[torch.Tensor] = []
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: (seen.append(z), decode(z, *a, **k))[1]
        images = pipe(class_labels=[1], num_inference_steps=2, output_type="pt", generator=gen).images
        assert images.shape == (1, 3, TINY_IMAGE_SIZE[arch], TINY_IMAGE_SIZE[arch])
        latents = seen[0]
    else:
        cls = PixArtAlphaPipeline if arch == "pixart-alpha" else PixArtSigmaPipeline
        pipe = cls.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.transformer.use_additional_conditions == resolution_conditions
        size = tiny_image_size(arch, resolution_conditions=resolution_conditions)
        latents = pipe(
            "a red circle on the left",
            num_inference_steps=2,
            output_type="latent",
            height=size,
            width=size,
            use_resolution_binning=False,
            clean_caption=False,
            generator=gen,
        ).images
    assert pipe.transformer.config.num_layers == 8  # the default
    assert tuple(latents.shape) == _latent_shape(arch, resolution_conditions)
    assert torch.isfinite(latents).all()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_pipeline_deterministic(tmp_path: Path, arch: str) -> None:
    layers = 2 if arch.startswith("flux") else 1  # Flux: at least one double and one single block
    a = _files(make_tiny_pipeline(arch, tmp_path / "a", seed=3, num_layers=layers))
    b = _files(make_tiny_pipeline(arch, tmp_path / "b", seed=3, num_layers=layers))
    c = _files(make_tiny_pipeline(arch, tmp_path / "c", seed=4, num_layers=layers))
    assert a == b
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert any(k.endswith(".safetensors") for k in a) and a[weights] != c[weights]
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert len(modes) == 1, modes  # safetensors files as readable as the JSON beside them


def test_tiny_pipeline_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pixart-alpha, pixart-sigma, dit"):
        make_tiny_pipeline("sdxl", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        make_tiny_pipeline("dit", tmp_path / "full")
    with pytest.raises(ConfigError, match="pixart-alpha"):
        make_tiny_pipeline("dit", tmp_path / "y", resolution_conditions=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    assert (make_tiny_pipeline("dit", tmp_path / "empty", num_layers=1) / "model_index.json").is_file()
