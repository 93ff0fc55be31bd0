"""Tiny random-weight diffusers pipelines for offline tests.

Each pipeline keeps the real checkpoint's config shape (norm type, learned sigma, scheduler, VAE
scaling) but with tiny widths, and is written with the pipeline's own `save_pretrained`, so it
loads through the real `from_pretrained` code path without any hub access.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .adapters import make_adapter
from .errors import ConfigError
from .files import make_readable
from .ilf import FEEDBACK_DIR, FeedbackModule
from .loading import quiet_huggingface
from .plan import default_loop, validate_loop
from .schedulers import DIT_SCHEDULER_CONFIG, PIXART_SCHEDULER_CONFIG

MAX_LAYERS = 64  # a tiny model; PixArt-XL has 28
TINY_ARCHITECTURES = ("pixart-alpha", "pixart-sigma", "dit")

_VAE_BLOCKS = (16, 32, 32)  # 3 levels -> downsampling factor 4
VAE_SCALE_FACTOR = 2 ** (len(_VAE_BLOCKS) - 1)
_LATENT_SIZE = 8
_MS_LATENT_SIZE = 128  # diffusers feeds resolution/aspect-ratio conditions only at sample_size 128
TINY_IMAGE_SIZE: dict[str, int] = {a: _LATENT_SIZE * VAE_SCALE_FACTOR for a in TINY_ARCHITECTURES}
TINY_MS_IMAGE_SIZE = _MS_LATENT_SIZE * VAE_SCALE_FACTOR  # pixart-alpha, resolution_conditions=True

# T5 model_max_length of the real repos; VAE scaling (PixArt-Sigma ships the SDXL VAE).
_MAX_LENGTH = {"pixart-alpha": 120, "pixart-sigma": 300}
_VAE_SCALING = {"pixart-alpha": 0.18215, "pixart-sigma": 0.13025, "dit": 0.18215}

# The schedulers' constructor arguments (the configs without diffusers' `_class_name`).
PIXART_SCHEDULER: dict[str, Any] = {k: v for k, v in PIXART_SCHEDULER_CONFIG.items() if k != "_class_name"}
DIT_SCHEDULER: dict[str, Any] = {k: v for k, v in DIT_SCHEDULER_CONFIG.items() if k != "_class_name"}
DIT_ID2LABEL = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    2: "great white shark",
    3: "tiger shark",
}

# Shared tiny transformer shape: 2 heads x 8 dims, 4 latent channels, learned sigma.
_TRANSFORMER_COMMON: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,  # DiTPipeline hard-codes class 1000 as the null label
    norm_elementwise_affine=False,
)
_T5: dict[str, Any] = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)


def tiny_image_size(arch: str, *, resolution_conditions: bool = False) -> int:
    """Pixel size of the default sample (latent size x VAE factor)."""
    return TINY_MS_IMAGE_SIZE if resolution_conditions else TINY_IMAGE_SIZE[arch]


def make_tiny_pipeline(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int = 8,
    resolution_conditions: bool = False,
    loop: tuple[int, int] | None = None,
    feedback: bool = True,
) -> Path:
    """Write a seeded random-weight `arch` pipeline to `out_dir` (safetensors) and return it.

    With `feedback`, also a random ILF feedback module in `out_dir/feedback` over `loop` (default:
    the paper's 8-19 of 28 scaled to `num_layers`); its scales are small random numbers rather
    than zeros so that the feedback path changes the output and tests can see it.
    """
    if arch not in TINY_ARCHITECTURES:
        raise ConfigError(f"unknown tiny architecture {arch!r}; supported: {', '.join(TINY_ARCHITECTURES)}")
    if resolution_conditions and arch != "pixart-alpha":
        raise ConfigError("resolution conditions exist only for pixart-alpha (PixArt-α 1024)")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ConfigError(f"layers must be in 1..{MAX_LAYERS}, got {num_layers}")
    if feedback:
        validate_loop(*(loop or default_loop(num_layers)), num_layers)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet_huggingface()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # fork_rng: seed locally without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = _build(arch, num_layers, resolution_conditions)
            if feedback:
                module = FeedbackModule.create(
                    make_adapter(arch, pipe.transformer), loop or default_loop(num_layers)
                )
                torch.nn.init.normal_(module.scales, std=0.1)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if feedback:
            module.save(tmp / FEEDBACK_DIR)
        if arch in _MAX_LENGTH:
            _portable_tokenizer(tmp, _MAX_LENGTH[arch])
        make_readable(tmp)  # safetensors writes 0600
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _portable_tokenizer(pipe_dir: Path, max_length: int) -> None:
    """Re-save the tokenizer under the class name `PreTrainedTokenizerFast`.

    transformers 5 records its fast tokenizer as `TokenizersBackend`, a name transformers 4 lacks;
    `PreTrainedTokenizerFast` is an alias of it in 5 and the fast base class in 4.
    """
    from ilf_deploy.tokenizer import build_word_tokenizer, save_tokenizer_dir

    shutil.rmtree(pipe_dir / "tokenizer")
    save_tokenizer_dir(build_word_tokenizer(), pipe_dir / "tokenizer", max_length)
    index_path = pipe_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")  # diffusers' format


def word_text_encoder(t5: dict[str, Any], max_length: int):
    """(tokenizer, T5 encoder): the word-level tokenizer and a random-init T5 v1.1-flavoured encoder
    (gated-gelu FFN, untied embeddings) over its vocabulary. The caller seeds torch."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from .tokenizer import EOS, PAD, UNK, build_word_tokenizer

    tok = build_word_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=max_length
    )
    config = T5Config(
        vocab_size=tok.get_vocab_size(),
        **t5,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, T5EncoderModel(config).eval()


def _vae(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
        block_out_channels=_VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE[arch],
        scaling_factor=_VAE_SCALING[arch],
    )


def _build(arch: str, num_layers: int, resolution_conditions: bool):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    if arch == "dit":
        transformer = DiTTransformer2DModel(
            **_TRANSFORMER_COMMON,
            num_layers=num_layers,
            sample_size=_LATENT_SIZE,
            patch_size=2,
            norm_type="ada_norm_zero",
            norm_eps=1e-5,
        )
        pipe = DiTPipeline(transformer=transformer, vae=_vae(arch), scheduler=DDIMScheduler(**DIT_SCHEDULER))
        # DiTPipeline does not register id2label itself; in model_index.json it is passed back to __init__.
        pipe.register_to_config(id2label={str(k): v for k, v in DIT_ID2LABEL.items()})
        return pipe
    return _build_pixart(arch, num_layers, resolution_conditions)


def _build_pixart(arch: str, num_layers: int, resolution_conditions: bool):
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    tokenizer, text_encoder = word_text_encoder(_T5, _MAX_LENGTH[arch])
    extra: dict[str, Any]
    if resolution_conditions:  # PixArt-XL-2-1024-MS: sample_size 128; patch 8 keeps it to 16x16 tokens
        # The size/aspect-ratio embedding splits the inner dim in 3 parts: 2 heads x 12 = 24.
        extra = dict(
            sample_size=_MS_LATENT_SIZE, patch_size=8, use_additional_conditions=True, attention_head_dim=12
        )
    elif arch == "pixart-alpha":  # PixArt-XL-2-512x512 leaves interpolation_scale to the default
        extra = dict(sample_size=_LATENT_SIZE, patch_size=2)
    else:  # PixArt-Sigma-XL-2-512-MS: the conversion script sets both explicitly
        extra = dict(
            sample_size=_LATENT_SIZE, patch_size=2, interpolation_scale=1, use_additional_conditions=False
        )
    cfg = {**_TRANSFORMER_COMMON, **extra}
    transformer = PixArtTransformer2DModel(
        **cfg,
        num_layers=num_layers,
        norm_type="ada_norm_single",
        norm_eps=1e-6,
        cross_attention_dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
        caption_channels=text_encoder.config.d_model,
    )
    cls = PixArtAlphaPipeline if arch == "pixart-alpha" else PixArtSigmaPipeline
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(arch),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
