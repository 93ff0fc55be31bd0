"""Plan execution. Must not import diffusers or transformers: bundles run without them."""
