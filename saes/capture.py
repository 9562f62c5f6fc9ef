"""Model identity (weight hash) and the MLP capture the cache writer runs (`engine.hooks.mlp_hooks`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from crosspatch.engine.adapters import ArchAdapter, positions_from_mask
from crosspatch.engine.hooks import MlpHook, mlp_hooks


# ---- model identity -----------------------------------------------------------------------------------
def weight_hash(model: torch.nn.Module, full_below: int = 50_000_000) -> str:
    """sha256 of the weights (all bytes for small models; names, shapes and head/tail slices for big ones)."""
    h = hashlib.sha256()
    n_params = sum(p.numel() for p in model.parameters())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().cpu().contiguous().flatten()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if n_params > full_below:
            t = torch.cat([t[:4096], t[-4096:]])
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ("sha256:" if n_params <= full_below else "sha256-sampled:") + h.hexdigest()


# ---- capture --------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_mlp(
    adapter: ArchAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    hooks: Sequence[str],
) -> dict[tuple[int, str], torch.Tensor]:
    """Run blocks 0..max(layers) and return {(layer, hook): [batch, seq, d_model]}."""
    position_ids = positions_from_mask(attention_mask)
    resid = adapter.embed(input_ids, position_ids)  # [batch, seq, d_model]
    ctx = adapter.context(resid, attention_mask, position_ids)
    store: dict[tuple[int, str], torch.Tensor] = {}

    def grab(layer: int) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> None:
            if "mlp_in" in hooks:
                store[(layer, "mlp_in")] = x.detach()  # [batch, seq, d_model]
            if "mlp_out" in hooks:
                store[(layer, "mlp_out")] = out.detach()  # [batch, seq, d_model]

        return fn

    with mlp_hooks(adapter, {layer: grab(layer) for layer in layers}):
        adapter.run_layers(resid, ctx, 0, max(layers) + 1)
    return store
