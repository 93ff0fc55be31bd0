"""ilf-deploy: deploy diffusion transformers accelerated with Inner Loop Feedback (ILF)."""

__version__ = "0.1.0"
