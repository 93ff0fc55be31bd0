"""Image sizes on the command line: `HxW[,HxW...]` (build --resolutions, plan --sizes)."""

from __future__ import annotations

from ilf_deploy.core.errors import ConfigError


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_resolutions(
    text: str | None, height: int | None = None, width: int | None = None
) -> list[tuple[int, int]]:
    """'512x512,256x384' -> [(512, 512), (256, 384)], (height, width) in pixels; a --height/--width
    pair (one given: square) goes first."""
    sizes = []
    for part in split_list(text or ""):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"resolution {part!r} is not HxW (e.g. 512x512)") from None
        sizes.append((h, w))
    if height is not None or width is not None:  # one given: square (0 is refused, not "unset")
        side_h = height if height is not None else width
        side_w = width if width is not None else height
        sizes.insert(0, (side_h, side_w))  # type: ignore[arg-type]
    return sizes
