"""The Inner Loop Feedback module (ILF paper §3.1, eqs. 2–3).

The feedback module is one new block of the backbone's class and config plus one learnable scale per
inner-loop block, zero-initialised so that an untrained module changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ilf_deploy.core.errors import ModelLoadError
from ilf_deploy.core.files import make_readable
from ilf_deploy.core.plan import validate_loop
from ilf_deploy.core.state import add_scaled
from ilf_deploy.model.adapters import Adapter, Cond, State

FEEDBACK_DIR = "feedback"
CONFIG_FILE = "ilf_config.json"
WEIGHTS_FILE = "feedback.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeedbackConfig:
    architecture: str
    num_blocks: int
    loop_start: int
    loop_end: int
    format_version: int = FORMAT_VERSION
    # The t_post rule the module was trained with: ilf-N presets run the blocks after it the same way
    # (files written before this field existed were all trained with "rescale").
    t_post: str = "rescale"

    @property
    def loop(self) -> tuple[int, int]:
        return self.loop_start, self.loop_end

    @property
    def loop_size(self) -> int:
        return self.loop_end - self.loop_start + 1


class FeedbackModule(nn.Module):
    """f_feed = B_feed(f_{e,t}); inner block i then sees h + s_i * f_feed.

    On a model whose state has several tensors (an MMDiT's image and text streams) the feedback
    block is a block of the backbone's class, so f_feed is a whole state: every stream is fed back,
    with one shared scale s_i per inner block (the paper is silent here; docs/how-a-step-runs.md).
    """

    def __init__(self, block: nn.Module, config: FeedbackConfig) -> None:
        super().__init__()
        validate_loop(config.loop_start, config.loop_end, config.num_blocks)
        self.config = config
        self.block = block
        self.scales = nn.Parameter(torch.zeros(config.loop_size))

    @classmethod
    def create(cls, adapter: Adapter, loop: tuple[int, int], t_post: str = "rescale") -> FeedbackModule:
        validate_loop(*loop, adapter.num_blocks)
        config = FeedbackConfig(adapter.architecture, adapter.num_blocks, *loop, t_post=t_post)
        return cls(adapter.make_feedback_block(loop[1]), config)

    @property
    def loop(self) -> tuple[int, int]:
        return self.config.loop

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_FILE)
        make_readable(directory / WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: Path, adapter: Adapter) -> FeedbackModule:
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            hint = ""
            if any(directory.glob("*checkpoint*")):
                hint = " (only an unfinished training checkpoint: finish it with train-feedback --resume)"
            raise ModelLoadError(f"no ILF feedback config at {config_path}{hint}")
        raw = json.loads(config_path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"{config_path}: unsupported feedback format {raw.get('format_version')!r}")
        config = FeedbackConfig(**raw)
        if config.num_blocks != adapter.num_blocks:
            raise ModelLoadError(
                f"feedback was made for a {config.num_blocks}-block model, this one has {adapter.num_blocks}"
            )
        module = cls(adapter.make_feedback_block(config.loop_end), config)
        module.load_state_dict(load_file(directory / WEIGHTS_FILE))
        dtype = next(adapter.transformer.parameters()).dtype
        return module.to(dtype)


def run_blocks(adapter: Adapter, start: int, end: int, state: State, cond: Cond) -> State:
    for index in range(start, end + 1):
        state = adapter.block(index, state, cond)
    return state


def inner_loop(
    adapter: Adapter,
    feedback: FeedbackModule,
    state: State,
    cond: Cond,
    cond_post: Cond,
) -> State:
    """Blocks b..e with feedback: `state` is f_{b-1,t}; returns f_{e,t-r} (eqs. 2–3).

    First pass at t, the feedback block reads f_{e,t} at t, then the second pass adds s_i * f_feed
    before every inner block i, conditioned on t_post (eqs. 4–5).
    """
    start, end = feedback.loop
    f_feed = adapter.run_block(feedback.block, run_blocks(adapter, start, end, state, cond), cond)
    for index, scale in zip(range(start, end + 1), feedback.scales):
        state = adapter.block(index, add_scaled(state, scale, f_feed), cond_post)
    return state
