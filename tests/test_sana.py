"""Sana (linear attention, Gemma-2, DC-AE) on the reference runner: diffusers' SanaPipeline
reproduced at two resolutions, every plan kind, ILF on the token grid, FAD training."""

from __future__ import annotations

import pytest
import torch

from ilf_deploy.core.errors import ConfigError, ModelLoadError
from ilf_deploy.core.schedulers import SANA_SCHEDULER_CONFIG, scheduler_coefficients
from ilf_deploy.engines.backends.pytorch import Request, TorchGenerator
from ilf_deploy.model.adapters import SanaAdapter
from ilf_deploy.model.ilf import FeedbackModule, inner_loop, run_blocks
from ilf_deploy.model.loading import load_model, sana_prompt_format

from .conftest import SANA_SIZES
from .test_mmdit import fad_lowers_the_loss

PROMPT = "a small red circle at the top left on a blue background"


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("size", SANA_SIZES)
@pytest.mark.parametrize("guidance", [1.0, 4.5])
@torch.no_grad()
def test_reference_runner_matches_sana_pipeline(sana_model, size, guidance):
    """base-N from the same latents and prompt: ≤ 1e-4 relative L2 at two sizes, with and without
    classifier-free guidance (the negative prompt is encoded without the instruction)."""
    model = sana_model
    generator = TorchGenerator(model)
    request = generator.resolve(
        Request(prompt=PROMPT, seed=11, height=size[0], width=size[1], guidance_scale=guidance)
    )
    latents = generator.initial_latents(request)
    plan = model.resolve_plan("base-6", [size])
    got = generator.generate_latents(plan, request, latents)
    expected = model.text_pipeline(
        PROMPT,
        num_inference_steps=6,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        height=size[0],
        width=size[1],
        use_resolution_binning=False,
        output_type="latent",
    ).images
    assert got.shape == expected.shape == (1, 32, size[0] // 32, size[1] // 32)
    assert relative_l2(got, expected) <= 1e-4


@torch.no_grad()
def test_adapter_forward_is_the_transformer_forward(sana_model):
    """The cut forward (state = token grid) equals SanaTransformer2DModel.forward on a non-square grid."""
    model = sana_model
    generator = TorchGenerator(model)
    request = generator.resolve(Request(prompt=PROMPT, height=320, width=192))
    inputs = generator.batch_inputs([request], True, (10, 6))  # [negative; positive] rows
    x = torch.randn(2, 32, 10, 6, generator=torch.Generator().manual_seed(0))
    ref = model.adapter.transformer(
        x,
        encoder_hidden_states=inputs["prompt_embeds"],
        encoder_attention_mask=inputs["prompt_mask"],
        timestep=torch.tensor([600.0, 600.0]),
        return_dict=False,
    )[0]
    ours = model.adapter.forward(x, torch.tensor(600.0), inputs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    state = model.adapter.embed(x, {})
    assert state["hidden"].shape == (2, 10, 6, 16)  # (B, h, w, D): the grid rides in the shape


@torch.no_grad()
def test_prompts_are_encoded_as_sana_pipeline_does(sana_model):
    """Positive: the instruction template, then the select-index (first token + last 299);
    negative: no template. Both max_sequence_length long, masks as the pipeline builds them."""
    fmt = sana_prompt_format()
    assert fmt.max_sequence_length == 300 and fmt.instruction.startswith("Given a user prompt")
    generator = TorchGenerator(sana_model)
    pos = generator.encode_cached(PROMPT)
    neg = generator.encode_cached(PROMPT, negative=True)
    pipe = sana_model.text_pipeline
    embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
        PROMPT,
        True,
        negative_prompt=PROMPT,
        max_sequence_length=300,
        complex_human_instruction=list(fmt.complex_human_instruction),
    )
    torch.testing.assert_close(pos["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(pos["prompt_mask"], mask, rtol=0, atol=0)
    torch.testing.assert_close(neg["prompt_embeds"], neg_embeds, rtol=0, atol=0)
    torch.testing.assert_close(neg["prompt_mask"], neg_mask, rtol=0, atol=0)
    assert pos["prompt_embeds"].shape == neg["prompt_embeds"].shape == (1, 300, 32)
    assert not torch.equal(pos["prompt_mask"], neg["prompt_mask"])  # the template changed the tokens


@pytest.mark.parametrize(
    "spec", ["base-4", "ilf-4", "cache-6", "ilf-4-adapt1-4t0.3m2", "base-4-adapt1-4t0.3m2"]
)
@torch.no_grad()
def test_every_plan_kind_generates(sana_model, spec):
    model = sana_model
    generator = TorchGenerator(model)
    height, width = SANA_SIZES[1]
    plan = model.resolve_plan(spec, [(height, width)])
    latents = generator.generate_latents(plan, Request(prompt=PROMPT, seed=1, height=height, width=width))
    assert torch.isfinite(latents).all()
    if "adapt" not in spec:
        assert generator.last_block_forwards == [plan.block_forwards]
    image = generator.decode(latents)
    assert image.shape == (1, height, width, 3) and image.std() > 0


@pytest.mark.parametrize("spec", ["ilf-6-cache1-4r2", "ilf-6-adapt1-4t0.3m2"])
@torch.no_grad()
def test_composed_and_adaptive_plans_batch_as_each_image_alone(sana_model, spec):
    generator = TorchGenerator(sana_model)
    plan = sana_model.resolve_plan(spec)
    requests = [Request(prompt=p, seed=s) for p, s in ((PROMPT, 1), ("a green square", 2))]
    batch = generator.generate_batch(plan, requests)
    ran = list(generator.last_block_forwards)
    assert all(n < sana_model.resolve_plan("ilf-6").block_forwards for n in ran)  # the cache skipped blocks
    for i, request in enumerate(requests):
        alone = generator.generate_latents(plan, request)
        assert generator.last_block_forwards == [ran[i]]
        assert relative_l2(batch[i : i + 1], alone) <= 1e-5


@torch.no_grad()
def test_zero_feedback_is_the_plain_forward(sana_model):
    """ILF eqs. 2-3 on the token grid: zero scales and t_post = t change nothing; non-zero ones do."""
    model = sana_model
    adapter = model.adapter
    feedback = FeedbackModule.create(adapter, model.feedback.loop)
    assert type(feedback.block) is type(adapter.blocks[0])
    generator = TorchGenerator(model)
    request = generator.resolve(Request(prompt=PROMPT))
    latents = torch.from_numpy(generator.initial_latents(request))
    inputs = generator.batch_inputs([request], False, tuple(latents.shape[-2:]))
    cond = adapter.conditioning(torch.tensor([700.0]), adapter.context(inputs))
    state = run_blocks(adapter, 0, feedback.loop[0] - 1, adapter.embed(latents, cond), cond)
    plain = run_blocks(adapter, *feedback.loop, state, cond)
    looped = inner_loop(adapter, feedback, state, cond, cond)
    torch.testing.assert_close(looped["hidden"], plain["hidden"], rtol=0, atol=1e-6)
    torch.nn.init.normal_(feedback.scales, std=0.5)
    assert not torch.allclose(inner_loop(adapter, feedback, state, cond, cond)["hidden"], plain["hidden"])


def test_bare_transformer_directory_plans_with_sana_defaults(sana_dir):
    model = load_model(sana_dir / "transformer")
    assert model.architecture == "sana" and model.text_pipeline is None
    assert model.scheduler_config == SANA_SCHEDULER_CONFIG
    assert model.vae_scale_factor == 32 and model.default_image_size == 256
    plan = model.resolve_plan("base-20")
    assert [s.coefficients for s in plan.steps] == scheduler_coefficients(SANA_SCHEDULER_CONFIG, 20)
    assert plan.steps[0].timestep == 999.0  # int64(sigma_0 * 1000), sigma_0 = 0.99967 after shift 3
    assert load_model(sana_dir).vae_scale_factor == 32  # from the DC-AE's levels


def test_guidance_embedding_configs_are_refused(sana_model):
    from diffusers import SanaTransformer2DModel

    config = {**dict(sana_model.adapter.config), "guidance_embeds": True}
    sprint = SanaTransformer2DModel.from_config(config)
    with pytest.raises(ConfigError, match="Sana-Sprint"):
        SanaAdapter(sprint)


def test_unknown_sana_class_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "SanaSprintPipeline"}')
    with pytest.raises(ModelLoadError, match="SanaPipeline") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_fad_training_lowers_the_loss(sana_dir, tmp_path):
    """FAD with flow noising (velocity targets) on the token grid; the backbone stays bit-identical."""
    model = load_model(sana_dir)
    assert model.adapter.latent_channels == 32  # DC-AE latents, at the tiny model's 8x8 grid
    fad_lowers_the_loss(model, tmp_path)


def test_tiny_sana_is_shaped_like_the_real_pipeline(sana_model, sana_dir):
    """make-tiny sana: the real classes, Gemma's special-token ids and bos-only template, DC-AE 32x."""
    import json

    from transformers import AutoTokenizer

    pipe = sana_model.text_pipeline
    assert type(pipe).__name__ == "SanaPipeline" and pipe.vae_scale_factor == 32
    assert type(pipe.text_encoder).__name__ == "Gemma2Model"
    assert type(pipe.vae).__name__ == "AutoencoderDC"
    tokenizer = AutoTokenizer.from_pretrained(sana_dir / "tokenizer")
    ids = tokenizer("A red cat").input_ids
    assert ids[0] == tokenizer.bos_token_id == 2 and len(ids) == 4  # <bos> + 3 words, no <eos>
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 3)
    scheduler = json.loads((sana_dir / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SANA_SCHEDULER_CONFIG if k != "_class_name"} == {
        k: v for k, v in SANA_SCHEDULER_CONFIG.items() if k != "_class_name"
    }


@torch.no_grad()
def test_sincos_positions_of_sana_4k_configs(sana_model):
    """A config with `interpolation_scale` (Sana 4K) adds sin-cos positions: the adapter embeds them
    (recomputed for a grid other than sample_size's) as PatchEmbed does."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    config = {**dict(sana_model.adapter.config), "interpolation_scale": 1, "num_layers": 2}
    transformer = SanaTransformer2DModel.from_config(config).eval()
    adapter = SanaAdapter(transformer)
    assert adapter.uses_positions and not sana_model.adapter.uses_positions
    inputs = {"prompt_embeds": torch.randn(1, 5, 32), "prompt_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    for h, w in ((8, 8), (10, 6)):
        x = torch.randn(1, 32, h, w)
        ref = transformer(
            x,
            encoder_hidden_states=inputs["prompt_embeds"],
            encoder_attention_mask=inputs["prompt_mask"],
            timestep=torch.tensor([300.0]),
            return_dict=False,
        )[0]
        torch.testing.assert_close(adapter.forward(x, torch.tensor(300.0), inputs), ref, rtol=0, atol=1e-6)
