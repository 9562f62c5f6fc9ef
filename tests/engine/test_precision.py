"""Margins are read in fp32 whatever the weights' dtype (issue: precision on real checkpoints)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch, margin
from crosspatch.engine.divergence import find_divergences


def _bf16_pair_with_large_logits():
    """A tiny Llama pair in bf16 whose logits reach ~20-30 (final norms scaled), where bf16's step is 1/8."""
    pair = tiny_pair("llama", it_scale=0.05)
    for model in (pair.pt, pair.it):
        model.to(torch.bfloat16)
    with torch.no_grad():
        for adapter in (pair.pt_adapter, pair.it_adapter):
            adapter.final_norm.weight.mul_(40.0)
    return pair


def test_bf16_margins_are_not_quantised() -> None:
    """With bf16 weights the engine's margins are not multiples of bf16's step at that magnitude; a bf16
    readout (norm and unembedding in the weights' dtype, as before) gives multiples of it."""
    pair = _bf16_pair_with_large_logits()
    events = [e for e in find_divergences(pair, random_prompts(24, seed=3), max_new_tokens=8) if e.diverged]
    assert len(events) >= 12
    cells = crosspatch(pair, events, boundary=0.6)
    y = cells.column("y_itup_itlate").to_numpy()
    assert np.abs(y).max() > 1.0
    # fraction of margins that sit on a 1/64 grid (bf16 logits of magnitude >= 2 have steps >= 1/64); rtol=0:
    # a relative tolerance would count every large margin as on the grid; atol covers fp32 rounding at |y| ~ 200
    on_grid = np.mean(np.isclose(y * 64, np.round(y * 64), rtol=0, atol=1e-3))
    assert on_grid < 0.2

    torch.set_grad_enabled(False)  # restored below
    adapter = pair.it_adapter
    final = torch.randn(8, adapter.d_model).to(torch.bfloat16) * 4
    tokens = torch.randint(0, 500, (8, 2))
    h_bf16 = adapter.final_norm(final)  # the old computation: all in bf16
    logits_bf16 = torch.einsum("bd,bkd->bk", h_bf16, adapter.unembed.weight[tokens]).float()
    y_bf16 = (logits_bf16[:, 0] - logits_bf16[:, 1]).numpy()
    assert np.mean(np.isclose(y_bf16 * 64, np.round(y_bf16 * 64), rtol=0, atol=1e-6)) == 1.0
    y_fp32 = margin(adapter, final, tokens).numpy()
    # the fp32 readout equals the same computation done in float64 from the same bf16 residual
    h64 = torch.func.functional_call(
        adapter.final_norm,
        {k: v.double() for k, v in adapter.final_norm.state_dict().items()},
        (final.double(),),
    )
    logits64 = torch.einsum("bd,bkd->bk", h64, adapter.unembed.weight[tokens].double())
    np.testing.assert_allclose(y_fp32, (logits64[:, 0] - logits64[:, 1]).numpy(), atol=1e-4)
    assert np.abs(y_fp32 - y_bf16).max() > 1e-3
    torch.set_grad_enabled(True)


def test_fp32_readout_is_the_models_own_computation() -> None:
    """With fp32 weights the token-column readout is exactly the computation before fp32 readout existed
    (norm and columns in the weights' dtype), and equals the full-vocabulary logits at those columns."""
    pair = tiny_pair("gemma3")
    adapter = pair.it_adapter
    final = torch.randn(6, adapter.d_model)
    tokens = torch.randint(0, 500, (6, 2))
    full = adapter.readout(final)  # [6, vocab], the module's own forward
    cols = adapter.readout(final, tokens)  # [6, 2]
    before = torch.einsum("bd,bkd->bk", adapter.final_norm(final), adapter.unembed.weight[tokens])
    if adapter.softcap is not None:
        before = torch.tanh(before / adapter.softcap) * adapter.softcap
    assert torch.equal(cols, before)
    torch.testing.assert_close(cols, torch.gather(full, 1, tokens), atol=1e-5, rtol=0)


def test_fp32_readout_removes_the_readout_error_of_a_bf16_run() -> None:
    """On a bf16 run's own final residuals, the engine's fp32 readout gives each event's interaction as a
    float64 readout of the same residuals does (to fp32 rounding), while the old bf16 readout (norm and
    columns in bf16) is off by about a bf16 step; the blocks' own bf16 drift, common to both readouts and
    machine-dependent, is measured in bench/bench_precision.py, not here."""
    from crosspatch.engine.crosspatch import CELLS, clean_passes, event_batches, late_stack_final, margin

    pair = _bf16_pair_with_large_logits()
    events = [e for e in find_divergences(pair, random_prompts(24, seed=3), max_new_tokens=8) if e.diverged]
    assert len(events) >= 12
    adapter = pair.it_adapter
    norm64 = {k: v.double() for k, v in adapter.final_norm.state_dict().items()}

    def readouts(h, tokens):  # [batch, d_model] bf16 -> margins: engine fp32, old bf16, float64
        old = torch.einsum("bd,bkd->bk", adapter.final_norm(h), adapter.unembed.weight[tokens]).float()
        h64 = torch.func.functional_call(adapter.final_norm, norm64, (h.double(),))
        exact = torch.einsum("bd,bkd->bk", h64, adapter.unembed.weight[tokens].double())
        return (
            margin(adapter, h, tokens).double(),
            (old[:, 0] - old[:, 1]).double(),
            exact[:, 0] - exact[:, 1],
        )

    def interaction(y):  # dict cell -> [batch]
        return (y["y_itup_itlate"] - y["y_itup_ptlate"]) - (y["y_ptup_itlate"] - y["y_ptup_ptlate"])

    fp32_err, bf16_err = [], []
    with torch.no_grad():
        for _batch, ids, mask, tokens in event_batches(pair, events, 16):
            passes = clean_passes(pair, ids, mask, [3])
            per_cell = {
                col: readouts(late_stack_final(pair, up, late, passes, 3), tokens)
                for (up, late), col in CELLS.items()
            }
            fp32, bf16, exact = (interaction({col: r[i] for col, r in per_cell.items()}) for i in range(3))
            fp32_err.append((fp32 - exact).abs())
            bf16_err.append((bf16 - exact).abs())
    fp32_err, bf16_err = torch.cat(fp32_err), torch.cat(bf16_err)
    # measured on a 2-core AMD EPYC: fp32 max 9.6e-5 (|y| up to ~190, where an fp32 ulp is 1.5e-5), mean 3.6e-5;
    # bf16 mean 0.54
    assert float(fp32_err.max()) < 1e-3
    assert float(bf16_err.mean()) > 100 * float(fp32_err.mean())
