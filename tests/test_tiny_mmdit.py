"""Tiny SD3 / Flux pipelines load with diffusers' own `from_pretrained` and generate offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.tiny import (
    CLIP_MAX_LENGTH,
    MMDIT_ARCHITECTURES,
    MMDIT_T5_MAX_LENGTH,
    TINY_ARCHITECTURES,
    TINY_IMAGE_SIZE,
    _build,
    make_tiny_pipeline,
)

PROMPT = "a red circle on the left"
PORTABLE = ["transformers", "PreTrainedTokenizerFast"]


def _load(arch: str, path: Path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (StableDiffusion3Pipeline if arch.startswith("sd3") else FluxPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, size: int, output_type: str, **kwargs):
    gen = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=size,
        width=size,
        output_type=output_type,
        generator=gen,
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmdit")
    out = {}
    for arch in MMDIT_ARCHITECTURES:
        out[arch] = make_tiny_pipeline(arch, root / arch, feedback=False)
    return out


def test_registered() -> None:
    assert set(MMDIT_ARCHITECTURES) <= set(TINY_ARCHITECTURES)
    assert {TINY_IMAGE_SIZE[a] for a in MMDIT_ARCHITECTURES} == {32}


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_model_index_loads_back(tiny: dict[str, Path], arch: str) -> None:
    path = tiny[arch]
    index = json.loads((path / "model_index.json").read_text())
    clip_names = ["tokenizer", "tokenizer_2"] if arch.startswith("sd3") else ["tokenizer"]
    t5_name = "tokenizer_3" if arch.startswith("sd3") else "tokenizer_2"
    for name in [*clip_names, t5_name]:
        assert index[name] == PORTABLE
        tok = AutoTokenizer.from_pretrained(path / name)
        assert tok.model_max_length == (CLIP_MAX_LENGTH if name in clip_names else MMDIT_T5_MAX_LENGTH)
    if arch.startswith("sd3"):
        assert (
            index["text_encoder"]
            == index["text_encoder_2"]
            == ["transformers", "CLIPTextModelWithProjection"]
        )
        assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    else:
        assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
        assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]


def test_clip_tokenizer_and_pooling(tiny: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["sd3"] / "tokenizer")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert eos == len(tok) - 1 and bos == eos - 1  # CLIP's layout: the two highest ids
    # exactly how the SD3 / Flux pipelines call their CLIP tokenizers
    ids = tok(
        ["A RED circle", "", " ".join(["cat"] * 100)],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    red, circle = tok.convert_tokens_to_ids(["red", "circle"])
    assert ids.shape == (3, 77) and ids[0, :5].tolist() == [
        bos,
        tok.convert_tokens_to_ids("a"),
        red,
        circle,
        eos,
    ]
    assert ids[1, :2].tolist() == [bos, eos] and (ids[1, 2:] == eos).all()
    assert ids[2, 0] == bos and ids[2, -1] == eos  # truncation keeps both ends
    first_eos = (ids == eos).int().argmax(-1)
    for sub, cls in [
        ("sd3/text_encoder_2", CLIPTextModelWithProjection),
        ("flux/text_encoder", CLIPTextModel),
    ]:
        model = cls.from_pretrained(tiny[sub.split("/")[0]] / sub.split("/")[1])
        assert model.config.eos_token_id == eos != 2  # not the legacy argmax pooling
        hidden = model(ids, output_hidden_states=True)
        assert len(hidden.hidden_states) == model.config.num_hidden_layers + 1
        if cls is CLIPTextModel:  # the pooled output is the first <|endoftext|> position
            assert torch.equal(hidden.pooler_output, hidden.last_hidden_state[torch.arange(3), first_eos])


def test_sd3_config(tiny: dict[str, Path]) -> None:
    pipe = _load("sd3", tiny["sd3"])
    cfg = pipe.transformer.config
    assert [b.context_pre_only for b in pipe.transformer.transformer_blocks] == [False] * 7 + [True]
    assert (cfg.num_layers, cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.qk_norm) == (
        8,
        2,
        16,
        16,
        None,
    )
    assert cfg.sample_size * pipe.vae_scale_factor == TINY_IMAGE_SIZE["sd3"]
    assert cfg.pos_embed_max_size >= 2 * cfg.sample_size // cfg.patch_size
    te, te2, te3 = pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
    assert cfg.pooled_projection_dim == te.config.projection_dim + te2.config.projection_dim
    assert cfg.joint_attention_dim == te3.config.d_model > te.config.hidden_size + te2.config.hidden_size
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert (
        pipe.vae.config.latent_channels,
        pipe.vae.config.scaling_factor,
        pipe.vae.config.shift_factor,
    ) == (
        16,
        1.5305,
        0.0609,
    )
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=MMDIT_T5_MAX_LENGTH)
    assert embeds.shape == (1, 77 + MMDIT_T5_MAX_LENGTH, cfg.joint_attention_dim)
    assert pooled.shape == (1, cfg.pooled_projection_dim)
    # SD3.5's qk RMSNorm, an option of _build
    qk = _build("sd3", 2, False, qk_norm="rms_norm").transformer
    assert qk.config.qk_norm == "rms_norm" and qk.transformer_blocks[0].attn.norm_q is not None


@pytest.mark.parametrize("arch", ["flux", "flux-schnell"])
def test_flux_config(tiny: dict[str, Path], arch: str) -> None:
    pipe = _load(arch, tiny[arch])
    cfg = pipe.transformer.config
    assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1 and cfg.num_layers + cfg.num_single_layers == 8
    assert (len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)) == (
        4,
        4,
    )
    assert cfg.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    sched = pipe.scheduler.config
    if arch == "flux":
        assert cfg.guidance_embeds and sched.use_dynamic_shifting
        assert (sched.base_shift, sched.max_shift, sched.base_image_seq_len, sched.max_image_seq_len) == (
            0.5,
            1.15,
            256,
            4096,
        )
    else:
        assert not cfg.guidance_embeds and not sched.use_dynamic_shifting and sched.shift == 1.0
    assert TINY_IMAGE_SIZE[arch] % (pipe.vae_scale_factor * 2) == 0


def test_flux_layers_split(tmp_path: Path) -> None:
    path = make_tiny_pipeline("flux", tmp_path / "f3", num_layers=3, feedback=False)
    cfg = json.loads((path / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (1, 2)
    with pytest.raises(ConfigError, match="layers >= 2"):
        make_tiny_pipeline("flux-schnell", tmp_path / "f1", num_layers=1, feedback=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f3"]


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_generates(tiny: dict[str, Path], arch: str) -> None:
    pipe = _load(arch, tiny[arch])
    sizes = [TINY_IMAGE_SIZE[arch], 2 * TINY_IMAGE_SIZE[arch]]
    for size in sizes:
        side = size // pipe.vae_scale_factor
        latents = _run(pipe, size, "latent", max_sequence_length=MMDIT_T5_MAX_LENGTH)
        # FluxPipeline returns its latents packed 2x2: (batch, tokens, 4 * channels)
        expected = (1, 16, side, side) if arch.startswith("sd3") else (1, (side // 2) ** 2, 64)
        assert tuple(latents.shape) == expected and torch.isfinite(latents).all()
        images = _run(pipe, size, "np", max_sequence_length=MMDIT_T5_MAX_LENGTH)
        assert images.shape == (1, size, size, 3) and np.isfinite(images).all()
    # the pipelines' own T5 length (SD3 256, Flux 512), not the tokenizer's model_max_length
    images = _run(pipe, sizes[0], "np")
    assert images.shape == (1, sizes[0], sizes[0], 3) and np.isfinite(images).all()


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_deterministic(tmp_path: Path, arch: str) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(make_tiny_pipeline(arch, tmp_path / "a", seed=3, num_layers=2, feedback=False))
    b = files(make_tiny_pipeline(arch, tmp_path / "b", seed=3, num_layers=2, feedback=False))
    c = files(make_tiny_pipeline(arch, tmp_path / "c", seed=4, num_layers=2, feedback=False))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert a == b and a[weights] != c[weights]
