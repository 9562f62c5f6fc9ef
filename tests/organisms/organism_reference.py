"""A frozen, hook-based 2x2 reference for organism tests, independent of the engine.

It follows the method's code directly: a forward pre-hook on `layers[b]` captures the donor's residual
entering block b (all positions) and another replaces the host's with it; Y is read from the host's logits
at the last position. Constructed organisms share the readout, so the host's logits equal common-IT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _boundary_input(model: PreTrainedModel, ids: torch.Tensor, boundary: int) -> torch.Tensor:
    """`[1, seq, d_model]` residual entering block `boundary` in an unpatched forward pass."""
    seen: dict[str, torch.Tensor] = {}

    def capture(_module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = _blocks(model)[boundary].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(ids)
    finally:
        handle.remove()
    return seen["h"]


def _patched_logits(
    host: PreTrainedModel,
    ids: torch.Tensor,
    boundary: int,
    donor_state: torch.Tensor | None,
    mlp_ablation: tuple[int, Sequence[int]] | None = None,
) -> torch.Tensor:
    """`[vocab]` last-position logits of `host` with the boundary input replaced by `donor_state`.

    `mlp_ablation=(layer, neurons)` zeroes those MLP neurons' activations at the last position.
    """
    handles = []

    def replace(_module, args, kwargs):
        if args:
            return (donor_state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": donor_state}

    def ablate(_module, args):
        acts = args[0].clone()  # [1, seq, d_mlp]
        acts[:, -1, list(mlp_ablation[1])] = 0.0
        return (acts,)

    try:
        if donor_state is not None:
            handles.append(_blocks(host)[boundary].register_forward_pre_hook(replace, with_kwargs=True))
        if mlp_ablation is not None:
            down = _blocks(host)[mlp_ablation[0]].mlp.down_proj
            handles.append(down.register_forward_pre_hook(ablate))
        with torch.no_grad():
            return host(ids).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def reference_cells(
    pt: PreTrainedModel,
    it: PreTrainedModel,
    input_ids: Sequence[int],
    t_pt: int,
    t_it: int,
    boundary: int,
    it_late_ablation: tuple[int, Sequence[int]] | None = None,
) -> dict[str, float]:
    """The four cells and three effects for one event; `it_late_ablation` applies to the IT-late cells."""
    ids = torch.tensor([list(input_ids)])  # [1, seq]
    with torch.no_grad():
        states = {"pt": _boundary_input(pt, ids, boundary), "it": _boundary_input(it, ids, boundary)}
    hosts = {"pt": pt, "it": it}
    cells: dict[str, float] = {}
    for up in ("pt", "it"):
        for late in ("pt", "it"):
            ablation = it_late_ablation if late == "it" else None
            logits = _patched_logits(hosts[late], ids, boundary, states[up], ablation)
            cells[f"y_{up}up_{late}late"] = float(logits[t_it] - logits[t_pt])
    cells["pt_late_effect"] = cells["y_ptup_itlate"] - cells["y_ptup_ptlate"]
    cells["it_late_effect"] = cells["y_itup_itlate"] - cells["y_itup_ptlate"]
    cells["interaction"] = cells["it_late_effect"] - cells["pt_late_effect"]
    return cells
