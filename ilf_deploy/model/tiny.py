"""Tiny random-weight diffusers pipelines for offline tests.

Each pipeline keeps the real checkpoint's config shape (norm type, learned sigma, scheduler, VAE
scaling) but with tiny widths, and is written with the pipeline's own `save_pretrained`, so it
loads through the real `from_pretrained` code path without any hub access.

The MMDiT pipelines (`sd3`: StableDiffusion3Pipeline; `flux`, `flux-schnell`: FluxPipeline) replace
the real CLIP BPE tokenizers by word-level ones (`clip_word_tokenizer`, 77 tokens, `<|startoftext|>`
... `<|endoftext|>`, padded with `<|endoftext|>`) and T5's with `build_word_tokenizer`; every
tokenizer is saved as a `PreTrainedTokenizerFast`. The T5 tokenizers' `model_max_length` is a tiny
`MMDIT_T5_MAX_LENGTH`, but the pipelines ignore it: they pad T5 prompts to their own
`max_sequence_length` argument (SD3 256, Flux 512 by default), so pass it to keep prompts short.

`sana` (SanaPipeline) is shaped like Sana-600M-512px: a `Gemma2Model` text encoder (2 layers, sliding
then full attention, soft-capped logits), a word-level stand-in for Gemma's tokenizer
(`gemma_word_tokenizer`: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<bos>` prepended, nothing
appended, as Gemma's), an `AutoencoderDC` with DC-AE's six levels (32x, ResBlocks then EfficientViT
blocks) at tiny widths, 32 latent channels, patch size 1 and the flow DPM-Solver. Its transformer's
`sample_size` is 8 (latents 8x8, images 256 px), which SanaPipeline's resolution binning does not
know: call the pipeline with `use_resolution_binning=False`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.files import make_readable, staged_directory
from ilf_deploy.core.plan import default_loop, validate_loop
from ilf_deploy.core.schedulers import DIT_SCHEDULER_CONFIG, PIXART_SCHEDULER_CONFIG, SANA_SCHEDULER_CONFIG
from ilf_deploy.model.adapters import make_adapter
from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule
from ilf_deploy.model.loading import quiet_huggingface

MAX_LAYERS = 64  # a tiny model; PixArt-XL has 28
MMDIT_ARCHITECTURES = ("sd3", "sd3.5", "flux", "flux-schnell")
TINY_ARCHITECTURES = ("pixart-alpha", "pixart-sigma", "dit", *MMDIT_ARCHITECTURES, "sana")
# The adapter family of a tiny variant (FLUX.1-schnell is a FluxPipeline like FLUX.1-dev).
ADAPTER_ARCHITECTURE = {"flux-schnell": "flux", "sd3.5": "sd3"}

_VAE_BLOCKS = (16, 32, 32)  # 3 levels -> downsampling factor 4
VAE_SCALE_FACTOR = 2 ** (len(_VAE_BLOCKS) - 1)
_LATENT_SIZE = 8
_MS_LATENT_SIZE = 128  # diffusers feeds resolution/aspect-ratio conditions only at sample_size 128
# Sana's DC-AE: six levels, 32x (as dc-ae-f32c32-sana-1.0), at tiny widths.
_DC_AE_BLOCKS = (8, 8, 16, 16, 32, 32)
SANA_VAE_SCALE_FACTOR = 2 ** (len(_DC_AE_BLOCKS) - 1)
TINY_IMAGE_SIZE: dict[str, int] = {
    a: _LATENT_SIZE * (SANA_VAE_SCALE_FACTOR if a == "sana" else VAE_SCALE_FACTOR) for a in TINY_ARCHITECTURES
}
TINY_MS_IMAGE_SIZE = _MS_LATENT_SIZE * VAE_SCALE_FACTOR  # pixart-alpha, resolution_conditions=True

# T5 model_max_length of the real repos; VAE scaling (PixArt-Sigma ships the SDXL VAE).
_MAX_LENGTH = {"pixart-alpha": 120, "pixart-sigma": 300}
_VAE_SCALING = {"pixart-alpha": 0.18215, "pixart-sigma": 0.13025, "dit": 0.18215}
# The 16-channel VAEs of SD3 and Flux: (scaling_factor, shift_factor) of the real repos' vae/config.json.
_VAE_SCALE_SHIFT = {
    "sd3": (1.5305, 0.0609),
    "sd3.5": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
    "flux-schnell": (0.3611, 0.1159),
}
MMDIT_T5_MAX_LENGTH = 32  # tiny; the real T5 tokenizers say 512 (see the module docstring)
CLIP_MAX_LENGTH = 77  # CLIP's context length, as in the real tokenizers and text encoders

# The schedulers' constructor arguments (the configs without diffusers' `_class_name`).
PIXART_SCHEDULER: dict[str, Any] = {k: v for k, v in PIXART_SCHEDULER_CONFIG.items() if k != "_class_name"}
DIT_SCHEDULER: dict[str, Any] = {k: v for k, v in DIT_SCHEDULER_CONFIG.items() if k != "_class_name"}
SANA_SCHEDULER: dict[str, Any] = {k: v for k, v in SANA_SCHEDULER_CONFIG.items() if k != "_class_name"}
# FlowMatchEulerDiscreteScheduler arguments of the real repos' scheduler/scheduler_config.json:
# stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
_FLUX_SHIFTS: dict[str, Any] = dict(
    base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
)
SD3_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, **_FLUX_SHIFTS
)
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, **_FLUX_SHIFTS
)
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
# SD3 pads the concatenated CLIP-L + CLIP-G hidden states (16 + 32) to the T5 width, so T5 is wider.
_SD3_T5: dict[str, Any] = {**_T5, "d_model": 64, "d_ff": 128}
# CLIP text towers: ViT-L/14 (768 wide, quick_gelu) and OpenCLIP bigG/14 (1280 wide, gelu), tiny.
_CLIP_L: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"
)
_CLIP_G: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"
)
# MMDiT widths: 2 heads x 16 dims; Flux's rope axes (text/frame, height, width) sum to the head dim.
_MMDIT_HEADS, _MMDIT_HEAD_DIM = 2, 16
_FLUX_AXES_DIMS_ROPE = (4, 6, 6)
# Patches per side: images up to 256 px (SD3-medium's 192 allows 3x its 1024 px default).
_SD3_POS_EMBED_MAX_SIZE = 32


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
    force: bool = False,
) -> Path:
    """Write a seeded random-weight `arch` pipeline to `out_dir` (safetensors) and return it; with
    `force`, one that is there already is replaced (only once the new one is complete).

    With `feedback`, also a random ILF feedback module in `out_dir/feedback` over `loop` (default:
    the paper's 8-19 of 28 scaled to `num_layers`); its scales are small random numbers rather
    than zeros so that the feedback path changes the output and tests can see it.

    For `flux`/`flux-schnell`, `num_layers` counts all transformer blocks: `num_layers // 2`
    double-stream blocks followed by the rest as single-stream blocks (so at least 2), and the
    feedback loop indexes that sequence of blocks.
    """
    _check_request(arch, num_layers, resolution_conditions, loop if feedback else None, feedback)
    out = Path(out_dir)
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet_huggingface()
    with staged_directory(out, replace=force) as tmp:  # renamed into place only when complete
        # fork_rng: seed locally without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = _build(arch, num_layers, resolution_conditions)
            if feedback:
                module = FeedbackModule.create(
                    make_adapter(ADAPTER_ARCHITECTURE.get(arch, arch), pipe.transformer),
                    loop or default_loop(num_layers),
                )
                torch.nn.init.normal_(module.scales, std=0.1)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if feedback:
            module.save(tmp / FEEDBACK_DIR)
        _save_tokenizers(tmp, arch, pipe)
        make_readable(tmp)  # safetensors writes 0600
    return out


def _check_request(
    arch: str, num_layers: int, resolution_conditions: bool, loop: tuple[int, int] | None, feedback: bool
) -> None:
    if arch not in TINY_ARCHITECTURES:
        raise ConfigError(f"unknown tiny architecture {arch!r}; supported: {', '.join(TINY_ARCHITECTURES)}")
    if resolution_conditions and arch != "pixart-alpha":
        raise ConfigError("resolution conditions exist only for pixart-alpha (PixArt-α 1024)")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ConfigError(f"layers must be in 1..{MAX_LAYERS}, got {num_layers}")
    if arch.startswith("flux") and num_layers < 2:
        raise ConfigError(f"{arch} needs layers >= 2 (double- and single-stream blocks), got {num_layers}")
    if feedback:
        validate_loop(*(loop or default_loop(num_layers)), num_layers)


def _save_tokenizers(pipe_dir: Path, arch: str, pipe: Any) -> None:
    """Every tokenizer re-saved in the portable form `_portable_tokenizer` writes."""
    if arch == "sana":
        _portable_tokenizer(pipe_dir, GEMMA_MAX_LENGTH, gemma=True)
    elif arch in _MAX_LENGTH:
        _portable_tokenizer(pipe_dir, _MAX_LENGTH[arch])
    elif arch in MMDIT_ARCHITECTURES:
        for name, clip in _MMDIT_TOKENIZERS[arch].items():
            _portable_tokenizer(pipe_dir, getattr(pipe, name).model_max_length, name, clip=clip)


def _portable_tokenizer(
    pipe_dir: Path, max_length: int, component: str = "tokenizer", *, clip: bool = False, gemma: bool = False
) -> None:
    """Re-save the tokenizer `component` under the class name `PreTrainedTokenizerFast`.

    transformers 5 records its fast tokenizer as `TokenizersBackend`, a name transformers 4 lacks;
    `PreTrainedTokenizerFast` is an alias of it in 5 and the fast base class in 4 (and
    `GemmaTokenizerFast` would rebuild a BPE model from the word-level vocabulary). With `clip`, the
    tokenizer is `clip_word_tokenizer`'s, with `gemma` `gemma_word_tokenizer`'s, otherwise the T5
    word tokenizer.
    """
    from ilf_deploy.model.tokenizer import build_word_tokenizer, save_tokenizer_dir

    shutil.rmtree(pipe_dir / component)
    if clip:
        save_tokenizer_dir(_clip_word_tokenizer_object(), pipe_dir / component, max_length, _CLIP_SPECIALS)
    elif gemma:
        save_tokenizer_dir(_gemma_word_tokenizer_object(), pipe_dir / component, max_length, _GEMMA_SPECIALS)
    else:
        save_tokenizer_dir(build_word_tokenizer(), pipe_dir / component, max_length)
    index_path = pipe_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index[component] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")  # diffusers' format


# The tokenizers of the MMDiT pipelines: True for the CLIP stand-ins, False for T5.
_MMDIT_TOKENIZERS: dict[str, dict[str, bool]] = {
    "sd3": {"tokenizer": True, "tokenizer_2": True, "tokenizer_3": False},
    "sd3.5": {"tokenizer": True, "tokenizer_2": True, "tokenizer_3": False},
    "flux": {"tokenizer": True, "tokenizer_2": False},
    "flux-schnell": {"tokenizer": True, "tokenizer_2": False},
}


CLIP_BOS, CLIP_EOS, CLIP_UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


def _clip_word_tokenizer_object():
    """The raw `tokenizers.Tokenizer` of `clip_word_tokenizer`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from ilf_deploy.model.tokenizer import DEFAULT_VOCAB

    # CLIP's layout: `<|startoftext|>` and `<|endoftext|>` are the two highest ids.
    vocab = {CLIP_UNK: 0}
    for word in DEFAULT_VOCAB:
        vocab.setdefault(word.lower(), len(vocab))
    vocab[CLIP_BOS], vocab[CLIP_EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(WordLevel(vocab, unk_token=CLIP_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])],
    )
    tok.add_special_tokens([CLIP_UNK, CLIP_BOS, CLIP_EOS])
    return tok


_CLIP_SPECIALS = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_UNK}


GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = "<pad>", "<eos>", "<bos>", "<unk>"
_GEMMA_SPECIALS = {
    "bos_token": GEMMA_BOS,
    "eos_token": GEMMA_EOS,
    "pad_token": GEMMA_PAD,
    "unk_token": GEMMA_UNK,
}
# Gemma-2's context (max_position_embeddings); SanaPipeline passes its own max_length to the tokenizer.
GEMMA_MAX_LENGTH = 8192


def _gemma_word_tokenizer_object():
    """The raw `tokenizers.Tokenizer` of `gemma_word_tokenizer`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    from ilf_deploy.model.tokenizer import DEFAULT_VOCAB

    # Gemma's special-token ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3.
    vocab = {token: i for i, token in enumerate((GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK))}
    for word in DEFAULT_VOCAB:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=GEMMA_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # Gemma: add_bos_token, not add_eos_token
        single=f"{GEMMA_BOS} $A",
        pair=f"{GEMMA_BOS} $A {GEMMA_BOS} $B",
        special_tokens=[(GEMMA_BOS, vocab[GEMMA_BOS])],
    )
    tok.add_special_tokens([GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK])
    return tok


def gemma_word_tokenizer(max_length: int = GEMMA_MAX_LENGTH):
    """A word-level stand-in for Gemma's tokenizer (ids of its special tokens, `<bos>` prepended)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_gemma_word_tokenizer_object(), model_max_length=max_length, **_GEMMA_SPECIALS
    )


def clip_word_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A word-level stand-in for CLIPTokenizer: `<|startoftext|> words <|endoftext|>`, padded with
    `<|endoftext|>` like CLIP ViT-L's tokenizer, truncated keeping both ends."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_clip_word_tokenizer_object(), model_max_length=max_length, **_CLIP_SPECIALS
    )


def clip_text_encoder(clip: dict[str, Any], *, projection: bool):
    """(tokenizer, random-init CLIP text encoder) over `clip_word_tokenizer`'s vocabulary:
    `CLIPTextModelWithProjection` (SD3's two encoders, projection as wide as the hidden size, as in
    CLIP-L and bigG) or `CLIPTextModel` (Flux). The pooled output is the first `<|endoftext|>`
    position (`eos_token_id` is not the legacy 2, and is also the highest id). The caller seeds torch."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_word_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **clip,
        projection_dim=clip["hidden_size"],
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return tokenizer, model.eval()


def word_text_encoder(t5: dict[str, Any], max_length: int):
    """(tokenizer, T5 encoder): the word-level tokenizer and a random-init T5 v1.1-flavoured encoder
    (gated-gelu FFN, untied embeddings) over its vocabulary. The caller seeds torch."""
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from ilf_deploy.model.tokenizer import EOS, PAD, UNK, build_word_tokenizer

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

    if arch in _VAE_SCALE_SHIFT:  # SD3/Flux: 16 latent channels, no quant convs, a shift factor
        scaling, shift = _VAE_SCALE_SHIFT[arch]
        extra: dict[str, Any] = dict(
            latent_channels=16, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False
        )
    else:
        scaling, extra = _VAE_SCALING[arch], dict(latent_channels=4)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
        block_out_channels=_VAE_BLOCKS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE[arch],
        scaling_factor=scaling,
        **extra,
    )


def _build(arch: str, num_layers: int, resolution_conditions: bool, *, qk_norm: str | None = None):
    """The pipeline object. `qk_norm` is SD3's ("rms_norm" as in SD3.5; None as in SD3-medium)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    if arch == "sd3":
        return _build_sd3(num_layers, qk_norm)
    if arch == "sd3.5":  # SD3.5-medium's MMDiT-X: q/k RMSNorm, dual attention in the first blocks
        return _build_sd3(num_layers, "rms_norm", dual_attention_layers=tuple(range(min(2, num_layers))))
    if arch in ("flux", "flux-schnell"):
        return _build_flux(arch, num_layers)
    if arch == "sana":
        return _build_sana(num_layers)
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


def _build_sd3(num_layers: int, qk_norm: str | None, dual_attention_layers: tuple[int, ...] = ()):
    """StableDiffusion3Pipeline shaped like SD3-medium: joint blocks (the last one context_pre_only),
    CLIP-L + CLIP-G pooled projections, the CLIP hidden states zero-padded to the T5 width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, text_encoder = clip_text_encoder(_CLIP_L, projection=True)
    tokenizer_2, text_encoder_2 = clip_text_encoder(_CLIP_G, projection=True)
    tokenizer_3, text_encoder_3 = word_text_encoder(_SD3_T5, MMDIT_T5_MAX_LENGTH)
    inner = _MMDIT_HEADS * _MMDIT_HEAD_DIM
    transformer = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=_MMDIT_HEAD_DIM,
        num_attention_heads=_MMDIT_HEADS,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=inner,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=_SD3_POS_EMBED_MAX_SIZE,
        qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_vae("sd3"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(arch: str, num_layers: int):
    """FluxPipeline shaped like FLUX.1-dev (guidance embedding, dynamic shift) or FLUX.1-schnell:
    `num_layers // 2` double-stream then the rest single-stream blocks; 16 latent channels packed
    2x2 into 64; the pooled projection is CLIP-L's pooled output, the context T5's hidden states."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, text_encoder = clip_text_encoder(_CLIP_L, projection=False)
    tokenizer_2, text_encoder_2 = word_text_encoder(_T5, MMDIT_T5_MAX_LENGTH)
    num_double = num_layers // 2
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_double,
        num_single_layers=num_layers - num_double,
        attention_head_dim=_MMDIT_HEAD_DIM,
        num_attention_heads=_MMDIT_HEADS,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=arch == "flux",
        axes_dims_rope=_FLUX_AXES_DIMS_ROPE,
    )
    scheduler = FLUX_DEV_SCHEDULER if arch == "flux" else FLUX_SCHNELL_SCHEDULER
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=_vae(arch),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


# Gemma-2-2b's shape at tiny widths: grouped-query attention (2 heads, 1 key/value head),
# query_pre_attn_scalar = head_dim, alternating sliding/full attention, soft-capped attention logits.
_GEMMA2: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    max_position_embeddings=GEMMA_MAX_LENGTH,
)
# dc-ae-f32c32-sana-1.0's scaling factor; its block layout (ResBlocks, then EfficientViT blocks with
# 5x5 multi-scale linear attention), upsampling by interpolation, RMS norms and SiLU.
_DC_AE_SCALING = 0.41407
_DC_AE_BLOCK_TYPES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_DC_AE_MULTISCALES = ((), (), (), (5,), (5,), (5,))
SANA_LATENT_CHANNELS = 32


def gemma_text_encoder():
    """(tokenizer, random-init `Gemma2Model`) over `gemma_word_tokenizer`'s vocabulary. The caller
    seeds torch."""
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_word_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        **_GEMMA2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, Gemma2Model(config).eval()


def _dc_ae():
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3,
        latent_channels=SANA_LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=_DC_AE_BLOCK_TYPES,
        decoder_block_types=_DC_AE_BLOCK_TYPES,
        encoder_block_out_channels=_DC_AE_BLOCKS,
        decoder_block_out_channels=_DC_AE_BLOCKS,
        encoder_layers_per_block=(1,) * len(_DC_AE_BLOCKS),
        decoder_layers_per_block=(1,) * len(_DC_AE_BLOCKS),
        encoder_qkv_multiscales=_DC_AE_MULTISCALES,
        decoder_qkv_multiscales=_DC_AE_MULTISCALES,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=_DC_AE_SCALING,
    )


def _build_sana(num_layers: int):
    """SanaPipeline shaped like Sana-600M-512px (2 heads x 8 dims): linear self-attention, caption
    cross-attention (2 heads x 8), Mix-FFN ratio 2.5, no positional embedding, patch size 1."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer, text_encoder = gemma_text_encoder()
    heads, head_dim = 2, 8
    transformer = SanaTransformer2DModel(
        in_channels=SANA_LATENT_CHANNELS,
        out_channels=SANA_LATENT_CHANNELS,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_cross_attention_heads=heads,
        cross_attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        caption_channels=text_encoder.config.hidden_size,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=_LATENT_SIZE,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_dc_ae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER),
    )
