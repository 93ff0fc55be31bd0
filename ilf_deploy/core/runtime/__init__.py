"""Plan execution: bundles, the denoising loop, the generator and the contract engines implement
(`runner.SegmentRunner`). Knows no engine by name and imports neither diffusers, transformers nor
torch (`lint-imports` holds this): ilf_deploy.engines.backends plugs the engines in."""
