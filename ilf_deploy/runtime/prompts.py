"""Prompt length in the bundle's tokenizer's tokens, for servers that refuse rather than truncate."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .bundle import Bundle


class PromptLimit:
    """Counts a prompt's tokens as `BundleGenerator.encode_prompt` sees them, before truncation."""

    def __init__(self, bundle: Bundle) -> None:
        self._tokenizer: Any = None
        self.max_tokens = 0
        spec = bundle.manifest.tokenizer
        if spec is not None:  # class-conditional models (DiT) have none: no prompt to check
            from tokenizers import Tokenizer

            # A copy without truncation or padding: the count must see what truncation would drop.
            self._tokenizer = Tokenizer.from_file(str(bundle.path / spec.file))
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()
            self.max_tokens = spec.max_length

    def check(self, text: str, name: str) -> None:
        """Refuse text longer than the model reads (the runtime would truncate it silently)."""
        if self._tokenizer is None:
            return
        tokens = len(self._tokenizer.encode(text.lower().strip()).ids)  # as BundleGenerator encodes
        if tokens > self.max_tokens:
            raise ConfigError(
                f"{name} is {tokens} tokens long; this model reads at most {self.max_tokens} "
                "(longer prompts are refused, not truncated)"
            )
