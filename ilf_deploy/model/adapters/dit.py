"""DiT (`DiTTransformer2DModel`): class-conditional, adaLN-Zero embeddings inside every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ilf_deploy.model.adapters.base import Adapter, Cond, State


class DiTAdapter(Adapter):
    """Mirrors `DiTTransformer2DModel.forward`, cut at block boundaries.

    Each DiT block embeds (timestep, class) itself (adaLN-Zero), so the per-timestep conditioning is
    the raw timestep; the final layer reuses block 0's embedding, as diffusers does.
    Inputs: `class_labels` (B,) int64; the null class for guidance is `num_classes`.
    """

    architecture = "dit"
    context_inputs = ("class_labels",)
    # Not named like the inputs: an ONNX graph cannot have an input and an output of one name.
    context_outputs = ("labels",)
    time_context_inputs = ()
    time_outputs = ("timesteps",)
    block_inputs = ("timesteps", "labels")
    final_inputs = ("timesteps", "labels")

    @property
    def num_classes(self) -> int:
        return int(self.config.num_embeds_ada_norm)

    def context(self, inputs: Cond) -> Cond:
        return {"labels": inputs["class_labels"].long()}

    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        return {"timesteps": timestep}

    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        return {"hidden": block(state["hidden"], timestep=cond["timesteps"], class_labels=cond["labels"])}

    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        t, hidden = self.transformer, state["hidden"]
        emb = t.transformer_blocks[0].norm1.emb(cond["timesteps"], cond["labels"], hidden_dtype=hidden.dtype)
        shift, scale = t.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        hidden = t.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        return t.proj_out_2(hidden)
