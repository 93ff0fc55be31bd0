"""Caption cross-attention K/V once per generation (build/export/cross_kv.py): the `cross_kv` segment.

Its parity with the C++ runtime is in tests/test_cpp.py (every plan kind on PixArt bundles that have
it), with the torch reference in every `verify` of a PixArt or Sana bundle.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ilf_deploy.build.export.build import example_tensors
from ilf_deploy.build.export.cross_kv import is_kv_name, kv_name, project_kv, reading_cached_kv
from ilf_deploy.core.runtime.bundle import MANIFEST, Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.runtime.manifest import CROSS_KV_SCHEMA_VERSION, CROSS_KV_SEGMENT, SCHEMA_VERSION
from ilf_deploy.core.schemas import problem
from ilf_deploy.engines.backends import open_generator

from .test_cli import invoke

PLANS = ("base-4", "ilf-4", "cache-6")


def test_a_pixart_bundle_projects_every_blocks_caption_kv_once(tiny_bundles, tiny_models):
    bundle = Bundle.load(tiny_bundles["pixart-alpha"])
    m = bundle.manifest
    cross = m.segment(CROSS_KV_SEGMENT)
    blocks = [kv_name(i) for i in range(m.model.num_blocks)]
    assert cross.input_names == ("context",)
    assert list(cross.output_names) == [*blocks, kv_name("feedback")]
    for spec in m.block_segments:  # each block segment reads its own blocks' [K | V], not the caption
        first, last = spec.blocks or (0, -1)
        assert "context" not in spec.input_names and "context_bias" in spec.input_names
        assert [n for n in spec.input_names if is_kv_name(n)] == blocks[first : last + 1]
    feedback = m.segment("feedback").input_names
    assert "context" not in feedback and kv_name("feedback") in feedback
    assert CROSS_KV_SEGMENT in m.reduced_precision_segments  # bf16 like the blocks,
    assert CROSS_KV_SEGMENT not in m.quantizable_segments  # but never int8: it runs once per image
    attn = tiny_models["pixart-alpha"].adapter.blocks[0].attn2
    width = attn.to_k.out_features + attn.to_v.out_features
    for spec in cross.outputs:  # [K | V], dynamic in batch and text length like the caption
        assert spec.shape == ("batch", "text_tokens", width), spec


def test_the_same_latents_as_a_bundle_that_projects_in_every_block(tiny_dirs, tiny_bundles, tmp_path):
    """`build --no-cache-cross-kv` writes the bundles of before (schema 2, the blocks read the
    caption); both give the same final latents on every plan kind."""
    plain = tmp_path / "plain"
    args = ("build", tiny_dirs["pixart-alpha"], "--out", plain, "--plans", ",".join(PLANS))
    result = invoke(*args, "--no-cache-cross-kv")
    assert result.exit_code == 0, result.output
    raw = json.loads((plain / MANIFEST).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and CROSS_KV_SEGMENT not in raw["segments"]
    assert all("context" in s.input_names for s in Bundle.load(plain).manifest.block_segments)

    cached_gen = open_generator(tiny_bundles["pixart-alpha"], "onnxruntime")
    plain_gen = open_generator(plain, "onnxruntime")
    height, width = cached_gen.bundle.manifest.resolutions[0]
    request = Request(prompt="a red square", negative_prompt="blurry", height=height, width=width)
    shape = (1, cached_gen.bundle.model.latent_channels, *cached_gen.latent_size(request))
    latents = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    for plan in PLANS:
        want = plain_gen.latents_to_numpy(
            plain_gen.generate_latents(plain_gen.bundle.plan(plan), request, latents)
        )
        got = cached_gen.latents_to_numpy(
            cached_gen.generate_latents(cached_gen.bundle.plan(plan), request, latents)
        )
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), plan
    assert len(cached_gen.segments.timings[CROSS_KV_SEGMENT]) == len(PLANS)  # once per generation
    assert CROSS_KV_SEGMENT not in plain_gen.segments.timings


def test_a_block_reading_cached_kv_is_the_block_and_leaves_it_as_it_was(tiny_models):
    model = tiny_models["pixart-sigma"]
    adapter = model.adapter
    ex = example_tensors(model, (64, 64))
    cond = {k: ex[k] for k in adapter.block_inputs}
    state = {"hidden": ex["hidden"]}
    block = adapter.blocks[2]
    view = reading_cached_kv(adapter, block)
    with torch.no_grad():
        want = adapter.run_block(block, state, cond)["hidden"]
        kv = project_kv(block.attn2, cond["context"])
        assert torch.equal(kv, ex[kv_name(2)])  # what the build's examples (and cross_kv) give
        got = adapter.run_block(view, state, {**cond, "context": kv})["hidden"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(block.attn2.to_k, torch.nn.Linear) and isinstance(block.attn2.to_v, torch.nn.Linear)
    assert view.attn2.to_q is block.attn2.to_q and view.ff is block.ff  # shared, not copied
    assert not isinstance(view.attn2.to_k, torch.nn.Linear)


def test_models_without_a_caption_cross_attention_have_no_cross_kv(tiny_bundles):
    raw = json.loads((tiny_bundles["dit"] / MANIFEST).read_text())
    assert CROSS_KV_SEGMENT not in raw["segments"] and raw["schema_version"] == SCHEMA_VERSION


def test_a_manifest_before_schema_7_cannot_hold_cross_kv(tiny_bundles):
    raw = json.loads((tiny_bundles["pixart-alpha"] / MANIFEST).read_text())
    assert raw["schema_version"] == CROSS_KV_SCHEMA_VERSION and problem("manifest", raw) is None
    assert problem("manifest", {**raw, "schema_version": 6}) is not None  # an older reader's version
