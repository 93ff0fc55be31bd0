"""The model's state between blocks: a dict of named arrays (model/adapters/base.py declares the names).

A state is operated on as a whole: these helpers apply +, - and a scaled add to each of its arrays,
for torch tensors and numpy arrays alike, so the loop, the Δ-cache and the ILF inner loop never
name a stream.
"""

from __future__ import annotations

from typing import Any

State = dict[str, Any]  # name -> array (a torch tensor or a numpy array)


def output_name(state: str) -> str:
    """A block segment's output name for state tensor `state` (an ONNX graph cannot reuse a name)."""
    return f"{state}_out"


def feed_name(state: str) -> str:
    """The ILF feed's name for state tensor `state` (`feed` for the image tokens, as bundles have it)."""
    return "feed" if state == "hidden" else f"{state}_feed"


def add(a: State, b: State) -> State:
    """a + b, tensor by tensor (`b` may cover fewer names: a feed for some streams only)."""
    return {name: a[name] + b[name] if name in b else a[name] for name in a}


def sub(a: State, b: State) -> State:
    return {name: a[name] - b[name] for name in a}


def add_scaled(a: State, scale: Any, b: State) -> State:
    """a + scale * b, tensor by tensor (ILF's h + s_i * f_feed, eqs. 2–3)."""
    return {name: a[name] + scale * b[name] if name in b else a[name] for name in a}


def rows(state: State) -> int:
    """The batch rows every tensor of the state has."""
    return int(next(iter(state.values())).shape[0])
