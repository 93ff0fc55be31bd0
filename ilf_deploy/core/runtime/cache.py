"""The Δ-cache of one batch while its plan runs: stored Δs, adaptive decisions, block forwards.

Every image of a batch decides for itself. A `cache_adaptive` op compares its input (the probe: for
a range that starts at block 1, the first block's output, as First-Block Cache does) with the input
at the key's last refresh, image by image: relative L1 = Σ|h - h_ref| / Σ|h_ref| over the image's
rows ([uncond; cond] when guiding) and over every tensor of the model's state (an MMDiT's image
and text tokens together). An image whose change is at most the op's `threshold`, and whose
key has been reused fewer than `max_reuse` times in a row, adds the stored Δ; the others run the
blocks, as a batch of just those images (its conditioning rows taken along). So each image sees
exactly the ops it would see alone, and block forwards are counted per image.

Arrays are the backend's (numpy, or torch on any device): only slicing, +, -, `abs`, the
segments' `concat`, and one host transfer of a per-row sum per decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ilf_deploy.core.plan import Op
from ilf_deploy.core.state import State, add, sub
from ilf_deploy.core.state import rows as state_rows

Array = Any


class CacheState:
    """One batch's cache: `images` images, whose rows are [uncond_1..n; cond_1..n] when `guided`."""

    def __init__(self, images: int, guided: bool) -> None:
        self.images, self.guided = images, guided
        self.deltas: dict[str, State] = {}  # key -> Δ = out - in of its range, all rows
        self.probes: dict[str, State] = {}  # key -> the range's input at its last refresh
        self.reuses: dict[str, list[int]] = {}  # key -> reuses in a row since the refresh, per image
        self.block_forwards = [0] * images  # per image: what actually ran

    def count(self, block_forwards: int, images: list[int] | None = None) -> None:
        for i in range(self.images) if images is None else images:
            self.block_forwards[i] += block_forwards

    def store(self, key: str, range_in: State, range_out: State) -> None:
        """A refresh of `key` for every image: its Δ, its probe, and no reuse since."""
        self.deltas[key], self.probes[key] = sub(range_out, range_in), range_in
        self.reuses[key] = [0] * self.images

    def reuse(self, key: str, hidden: State) -> State:
        self.reuses[key] = [n + 1 for n in self.reuses[key]]
        return add(hidden, self.deltas[key])

    def adaptive(self, seg: Any, op: Op, hidden: State, cond: dict[str, Array]) -> State:
        """`cache_adaptive`: per image, reuse the Δ or run blocks start..end (module docstring)."""
        key = op.key
        assert key is not None and op.threshold is not None and op.max_reuse is not None
        if key in self.deltas:
            change = self.change(hidden, self.probes[key])
            reuse = [c <= op.threshold and n < op.max_reuse for c, n in zip(change, self.reuses[key])]
        else:
            reuse = [False] * self.images
        fresh = [i for i in range(self.images) if not reuse[i]]
        self.count(op.size, fresh)
        if not fresh:
            return self.reuse(key, hidden)
        if len(fresh) == self.images:
            out = seg.blocks(op.start, op.end, hidden, cond)
            self.store(key, hidden, out)
            return out
        picked = self.rows(fresh)
        part_in = take_state(seg, hidden, picked)
        part_out = seg.blocks(op.start, op.end, part_in, take_cond(seg, cond, picked, state_rows(hidden)))
        out = mix_state(seg, picked, part_out, add(hidden, self.deltas[key]))
        self.deltas[key] = mix_state(seg, picked, sub(part_out, part_in), self.deltas[key])
        self.probes[key] = mix_state(seg, picked, part_in, self.probes[key])
        self.reuses[key] = [0 if i in fresh else n + 1 for i, n in enumerate(self.reuses[key])]
        return out

    def rows(self, images: list[int]) -> list[int]:
        """The batch rows of `images`, in the batch's order."""
        return images + [self.images + i for i in images] if self.guided else images

    def change(self, hidden: State, reference: State) -> list[float]:
        """Per image: Σ|hidden - reference| / Σ|reference| over its rows and the state's tensors."""
        diff = sum(row_l1(hidden[name] - reference[name]) for name in hidden)
        norm = sum(row_l1(reference[name]) for name in reference)
        if self.guided:
            n = self.images
            diff, norm = diff[:n] + diff[n:], norm[:n] + norm[n:]
        return [float(d / max(r, 1e-30)) for d, r in zip(diff, norm)]


def row_l1(x: Array) -> np.ndarray:
    """Σ|x| of each row (dim 0), as float64 on the host; a torch tensor is reduced on its device."""
    if hasattr(x, "detach"):
        return x.detach().abs().float().reshape(x.shape[0], -1).sum(1).double().cpu().numpy()
    return np.abs(np.asarray(x)).reshape(x.shape[0], -1).sum(1, dtype=np.float64)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as half-open runs of consecutive rows: [0, 1, 4] -> [(0, 2), (4, 5)]."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def take(seg: Any, x: Array, rows: list[int]) -> Array:
    """Rows `rows` (sorted) of `x`, by slicing and the backend's concat."""
    parts = [x[a:b] for a, b in _runs(rows)]
    return parts[0] if len(parts) == 1 else seg.concat(parts)


def take_state(seg: Any, state: State, rows: list[int]) -> State:
    return {name: take(seg, value, rows) for name, value in state.items()}


def mix_state(seg: Any, rows: list[int], part: State, whole: State) -> State:
    return {name: mix(seg, rows, part[name], whole[name]) for name in whole}


def take_cond(seg: Any, cond: dict[str, Array], rows: list[int], batch: int) -> dict[str, Array]:
    """The conditioning of `rows`: every entry with the batch as its first axis."""
    return {
        name: take(seg, value, rows) if getattr(value, "shape", ()) and value.shape[0] == batch else value
        for name, value in cond.items()
    }


def mix(seg: Any, rows: list[int], part: Array, whole: Array) -> Array:
    """`whole` with rows `rows` (sorted) replaced by `part`'s rows, in order."""
    inside = _runs(rows)
    parts, position, done = [], 0, 0
    for a, b in inside:
        if done < a:
            parts.append(whole[done:a])
        parts.append(part[position : position + b - a])
        position, done = position + b - a, b
    if done < whole.shape[0]:
        parts.append(whole[done:])
    return seg.concat(parts)
