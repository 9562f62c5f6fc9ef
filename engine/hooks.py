"""The one way crosspatch hooks a model: forward hooks on MLP modules, installed and removed together.

Hooks are global state on the model's modules. `mlp_hooks` installs one forward hook per (layer, fn) and
removes exactly the handles it added when the block exits, also when a hook, the forward or the
installation itself raises; hooks that others installed on the same modules are left alone.

A hook fn sees the MLP's input and output, both `[batch, seq, d_model]`, and returns the replacement output
(same shape) or None to keep it:

    with mlp_hooks(adapter, {3: lambda x, out: out * 0}):   # zero layer 3's MLP output
        logits = adapter.forward_logits(ids, mask)
    with mlp_hooks(adapter, [(3, capture), (3, edit)]):     # two hooks on one layer, run in this order
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

MlpHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
# (mlp input [batch, seq, d_model], mlp output [batch, seq, d_model]) -> new output or None


class HasMlps(Protocol):
    """What `mlp_hooks` needs of a model: its MLP module per layer (`engine.adapters.ArchAdapter` has it)."""

    def mlp(self, layer: int) -> nn.Module: ...


def _forward_hook(fn: MlpHook) -> Callable[..., torch.Tensor | None]:
    """Adapt `fn(mlp_in, mlp_out)` to torch's `(module, args, kwargs, output)` forward-hook signature."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> torch.Tensor | None:
        x = args[0] if args else next(iter(kwargs.values()))  # [batch, seq, d_model]
        out = output[0] if isinstance(output, tuple) else output  # [batch, seq, d_model]
        return fn(x, out)

    return hook


@contextlib.contextmanager
def mlp_hooks(
    adapter: HasMlps, hooks: Mapping[int, MlpHook] | Iterable[tuple[int, MlpHook]]
) -> Iterator[None]:
    """Run the block with `hooks` ({layer: fn} or (layer, fn) pairs) on the MLP outputs; always removed."""
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for layer, fn in pairs:
            handles.append(adapter.mlp(layer).register_forward_hook(_forward_hook(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
