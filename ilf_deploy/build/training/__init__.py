"""Training: the default model (VAE + text-to-image PixArt on the shapes dataset) and ILF feedback."""
