"""Exactness of the explicit stack, per family (fp32): the no-op checks every primitive rests on."""

from __future__ import annotations

import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.crosspatch import crosspatch_batch
from crosspatch.engine.divergence import left_pad
from crosspatch.engine.organisms.tiny import FAMILIES

TOL = 1e-5


def _batch(pair, n=4, seed=0):
    prompts = random_prompts(n, seed=seed, min_len=3, max_len=10)
    seqs = [pair.tokenizer.encode(p.text) for p in prompts]
    ids, mask = left_pad(seqs, 0, "cpu")
    return seqs, ids, mask


def _hf_logits(model, ids, mask, pre_hook_layer=None, replacement=None):
    """Reference: the HF model's own forward, optionally with a forward pre-hook replacing a block's input."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    handle = None
    if pre_hook_layer is not None:

        def swap(module, args, kwargs):
            return (replacement, *args[1:]), kwargs

        handle = blocks[pre_hook_layer].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_late_stack_from_own_residual_reproduces_clean_logits(family):
    pair = tiny_pair(family)
    _, ids, mask = _batch(pair)
    a = pair.pt_adapter
    ref = _hf_logits(pair.pt, ids, mask)  # [batch, seq, vocab]
    with torch.no_grad():
        pos = positions_from_mask(mask)
        resid = a.embed(ids, pos)
        ctx = a.context(resid, mask, pos)
        _, caps = a.run_layers(resid, ctx, capture_inputs=range(a.n_layers + 1))
        for b in range(a.n_layers + 1):
            late = a.readout(a.run_layers(caps[b], ctx, start=b)[0])
            assert (late - ref).abs().max().item() <= TOL, f"boundary {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_patched_cells_equal_hf_forward_with_pre_hook(family):
    pair = tiny_pair(family, it_scale=0.05)
    _, ids, mask = _batch(pair, seed=1)
    b = pair.default_boundary
    t_pt, t_it = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])
    cells = crosspatch_batch(pair, ids, mask, t_pt, t_it, [b], readouts=("own",))[(b, "own")]

    def captured_input(model):
        store = {}
        blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers

        def grab(module, args, kwargs):
            store["x"] = args[0].clone()

        h = blocks[b].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            _hf_logits(model, ids, mask)
        finally:
            h.remove()
        return store["x"]

    u_pt, u_it = captured_input(pair.pt), captured_input(pair.it)
    rows = torch.arange(4)

    def y(logits):
        return logits[rows, -1, t_it] - logits[rows, -1, t_pt]

    expected = {
        "y_ptup_ptlate": y(_hf_logits(pair.pt, ids, mask)),
        "y_itup_itlate": y(_hf_logits(pair.it, ids, mask)),
        "y_ptup_itlate": y(_hf_logits(pair.it, ids, mask, b, u_pt)),
        "y_itup_ptlate": y(_hf_logits(pair.pt, ids, mask, b, u_it)),
    }
    for col, ref in expected.items():
        assert (cells[col] - ref).abs().max().item() <= TOL, col
    # the off-diagonal cells really differ from the diagonal ones (the patch did something)
    assert (cells["y_ptup_itlate"] - cells["y_itup_itlate"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_with_padding_equals_one_at_a_time(family):
    pair = tiny_pair(family, it_scale=0.05)
    seqs, ids, mask = _batch(pair, n=5, seed=2)
    t_pt, t_it = torch.arange(5, 10), torch.arange(20, 25)
    b = pair.default_boundary
    batched = crosspatch_batch(pair, ids, mask, t_pt, t_it, [b])[(b, "it")]
    for i, seq in enumerate(seqs):
        one_ids = torch.tensor([seq])
        single = crosspatch_batch(
            pair, one_ids, torch.ones_like(one_ids), t_pt[i : i + 1], t_it[i : i + 1], [b]
        )
        for col, values in single[(b, "it")].items():
            assert abs(values[0].item() - batched[col][i].item()) <= TOL, (col, i)


def test_readouts_common_it_pt_and_own():
    pair = tiny_pair("llama", it_scale=0.05)
    _, ids, mask = _batch(pair)
    b = pair.default_boundary
    t_pt, t_it = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12])
    out = crosspatch_batch(pair, ids, mask, t_pt, t_it, [b], readouts=("it", "pt", "own"))
    # own readout: PT-late cells read through PT's head (= common-PT), IT-late cells through IT's (= common-IT)
    for col in ("y_ptup_ptlate", "y_itup_ptlate"):
        assert torch.equal(out[(b, "own")][col], out[(b, "pt")][col])
    for col in ("y_ptup_itlate", "y_itup_itlate"):
        assert torch.equal(out[(b, "own")][col], out[(b, "it")][col])
    assert not torch.equal(out[(b, "it")]["y_ptup_ptlate"], out[(b, "pt")]["y_ptup_ptlate"])
