"""Forward calls counted per model and per block: a measure of compute tests can assert (never timing).

`count_forwards(pair)` installs forward pre-hooks on both models and on each of their blocks, in a
`try/finally` that removes exactly its own handles. A model call (decode step, prefill, HF forward) counts
once under `model[role]` and L times under `blocks[role]`; a late stack from boundary b (`run_layers(...,
start=b)`) counts L - b blocks and no model call. Example: a fused 2x2 batch at boundary 3 of a 5-block pair
adds 2 to `blocks["pt"]` and 2 to `blocks["it"]`, and nothing to `model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from crosspatch.engine.adapters import ArchAdapter

ROLES = ("pt", "it")


class ResidentPair(Protocol):
    """Both models resident: a `ModelPair`."""

    @property
    def pt(self) -> torch.nn.Module: ...

    @property
    def it(self) -> torch.nn.Module: ...

    def adapter(self, role: str) -> ArchAdapter: ...


@dataclass
class ForwardCounts:
    """Calls per role: `model` (whole-model forwards), `blocks` (block forwards, whatever called them)."""

    model: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    blocks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))

    def add(self, other: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """`other` (a `to_dict()`) plus these counts, as a new dict."""
        return {
            kind: {r: other.get(kind, {}).get(r, 0) + mine[r] for r in ROLES}
            for kind, mine in (("model", self.model), ("blocks", self.blocks))
        }

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"model": dict(self.model), "blocks": dict(self.blocks)}


@contextmanager
def count_forwards(pair: ResidentPair) -> Iterator[ForwardCounts]:
    """Count the pair's model and block forward calls inside the block; the hooks leave with it."""
    counts = ForwardCounts()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def bump(table: dict[str, int], role: str) -> Callable[[torch.nn.Module, object], None]:
        def hook(_module: torch.nn.Module, _args: object) -> None:
            table[role] += 1

        return hook

    try:
        for role, model in (("pt", pair.pt), ("it", pair.it)):
            handles.append(model.register_forward_pre_hook(bump(counts.model, role)))
            for block in pair.adapter(role).blocks:
                handles.append(block.register_forward_pre_hook(bump(counts.blocks, role)))
        yield counts
    finally:
        for h in handles:
            h.remove()
