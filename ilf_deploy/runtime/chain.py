"""What every engine backend shares: a bundle's facts, block ranges over its block segments, and the
ILF inner loop. A backend (ONNX Runtime, TensorRT) supplies `run` and `zeros_like`."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .bundle import Bundle


class SegmentChain:
    def init_chain(self, bundle: Bundle) -> None:
        model = bundle.model
        self.latent_channels = int(model["latent_channels"])
        self.num_blocks = int(model["num_blocks"])
        self.patch_size = int(model["patch_size"])
        self.out_channels = int(model["out_channels"])
        self.loop = bundle.loop
        # (start, end, name, takes feed) for every block segment, in order
        self.block_segments = sorted(
            (spec["blocks"][0], spec["blocks"][1], name, "feed" in [i["name"] for i in spec["inputs"]])
            for name, spec in bundle.manifest["segments"].items()
            if spec.get("blocks")
        )

    def run(self, name: str, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def zeros_like(self, array: Any) -> Any:
        raise NotImplementedError

    def blocks(self, start: int, end: int, hidden: Any, cond: dict[str, Any], feed: Any = None) -> Any:
        """Blocks start..end through the segments that cover them; inside the loop, `feed` is added
        before every block (eqs. 2–3) and zero on the first pass."""
        position = start
        for first, last, name, feedable in self.block_segments:
            if first < start or last > end:
                continue
            if first != position:
                break
            feeds = {**cond, "hidden": hidden}
            if feedable:
                feeds["feed"] = feed if feed is not None else self.zeros_like(hidden)
            hidden = self.run(name, feeds)["hidden_out"]
            position = last + 1
        if position != end + 1:
            raise ConfigError(f"the bundle has no segments covering blocks {start}-{end} exactly")
        return hidden

    def inner_loop(self, hidden: Any, cond: dict[str, Any], cond_post: dict[str, Any]) -> Any:
        start, end = self.loop  # type: ignore[misc]  # check_plan guarantees a loop
        f_feed = self.run("feedback", {**cond, "hidden": self.blocks(start, end, hidden, cond)})["feed"]
        return self.blocks(start, end, hidden, cond_post, feed=f_feed)
