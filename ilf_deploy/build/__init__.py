"""Making artifacts: export to a bundle, quantized variants, feedback training."""
