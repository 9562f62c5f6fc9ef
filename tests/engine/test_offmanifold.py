"""Off-manifold checks on constructed organisms: interpolation slope and signed-permutation ratio."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import organism_events  # tests/helpers.py

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.offmanifold import (
    INTERPOLATION_SCHEMA,
    SIGNPERM_SCHEMA,
    offmanifold,
    signed_permutation,
    summarize_offmanifold,
)

N_PROMPTS = 24


@functools.cache
def _run(name: str):
    """Pair, diverged events, cells table and the two off-manifold tables of organism `name`."""
    _root, pair, events = organism_events(name, limit=N_PROMPTS)
    cells = crosspatch(pair, events)
    interp, perm = offmanifold(pair, events, batch_size=7)  # odd batch size: several padded batches
    return pair, events, cells, interp, perm


@pytest.mark.parametrize("name", ["llama_upstream_dependent", "llama_paper_sized"])
def test_upstream_dependent_slope_positive_and_signperm_small(name: str) -> None:
    _, events, cells, interp, perm = _run(name)
    assert interp.schema == INTERPOLATION_SCHEMA and perm.schema == SIGNPERM_SCHEMA
    assert interp.num_rows == 5 * len(events) and perm.num_rows == 3 * len(events)
    s = summarize_offmanifold(interp, perm)
    interaction = float(np.mean(cells.column("interaction").to_numpy()))
    # the curve starts at 0 and ends at the 2x2 interaction (same cells, computed the same way)
    assert s.curve[0] == 0.0
    assert s.interaction == pytest.approx(interaction, abs=1e-6)
    assert s.slope > 0 and s.slope_ci_low > 0, s
    # monotone along the straight path: the planted gate reads u, which grows linearly with alpha
    assert all(b > a for a, b in zip(s.curve, s.curve[1:], strict=False)), s.curve
    # a delta of the same norm in random coordinates recovers little of the effect
    assert s.ratio.estimate < 0.2 and s.ratio.ci_high < 0.5, s.ratio
    assert s.ratio.denominator == pytest.approx(interaction, abs=1e-6)


def test_self_contained_slope_is_zero() -> None:
    """U_IT == U_PT in `self_contained`: every interpolated state is the same, slope exactly 0."""
    _, _, _, interp, perm = _run("llama_self_contained")
    s = summarize_offmanifold(interp, perm)
    assert s.slope_ci_low <= 0.0 <= s.slope_ci_high
    assert abs(s.slope) < 1e-9 and max(abs(c) for c in s.curve) < 1e-9
    assert np.isnan(s.ratio.estimate)  # observed interaction is exactly 0: no ratio


def test_interpolated_cell_matches_a_hook_reference() -> None:
    """Y(U(0.25), L_IT) equals an HF forward of IT whose block-b input is replaced by the interpolated state."""
    pair, events, _, interp, _ = _run("llama_paper_sized")
    b = pair.default_boundary
    rows = interp.to_pydict()
    for event in events[:3]:
        ids = torch.tensor([event.input_ids])
        states = {}
        for role, model in (("pt", pair.pt), ("it", pair.it)):
            handle = model.model.layers[b].register_forward_pre_hook(
                lambda _m, args, role=role, states=states: states.__setitem__(role, args[0])
            )
            try:
                with torch.no_grad():
                    model(ids)
            finally:
                handle.remove()
        mixed = 0.75 * states["pt"] + 0.25 * states["it"]  # [1, seq, d_model]
        handle = pair.it.model.layers[b].register_forward_pre_hook(
            lambda _m, args, mixed=mixed: (mixed, *args[1:])
        )
        try:
            with torch.no_grad():
                logits = pair.it(ids).logits[0, -1]
        finally:
            handle.remove()
        want = float(logits[event.t_it] - logits[event.t_pt])
        i = next(
            k
            for k, (p, a) in enumerate(zip(rows["prompt_id"], rows["alpha"], strict=True))
            if p == event.prompt_id and a == 0.25
        )
        assert rows["y_itlate"][i] == pytest.approx(want, abs=1e-4)


def test_signed_permutation_keeps_norm_and_is_seeded() -> None:
    perm, signs = signed_permutation(64, seed=5)
    again = signed_permutation(64, seed=5)
    assert torch.equal(perm, again[0]) and torch.equal(signs, again[1])
    assert sorted(perm.tolist()) == list(range(64)) and set(signs.tolist()) == {-1, 1}
    delta = torch.randn(3, 64)
    assert torch.allclose((delta[:, perm] * signs).norm(dim=-1), delta.norm(dim=-1))
    assert not torch.equal(signed_permutation(64, seed=6)[0], perm)


def test_bad_inputs_raise_clear_errors() -> None:
    pair, events, _, interp, perm = _run("llama_upstream_dependent")
    with pytest.raises(ValueError, match="alphas"):
        offmanifold(pair, events[:2], alphas=[0.5])
    with pytest.raises(ValueError, match="alphas"):
        offmanifold(pair, events[:2], alphas=[0.0, 1.5])
    with pytest.raises(ValueError, match="readout"):
        offmanifold(pair, events[:2], readout="mine")
    with pytest.raises(ValueError, match="one boundary"):
        offmanifold(pair, events[:2], boundary="sweep")
    with pytest.raises(ValueError, match="no events"):
        summarize_offmanifold(interp.slice(0, 0), perm.slice(0, 0))
