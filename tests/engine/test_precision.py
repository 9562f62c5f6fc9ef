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
    # fraction of margins that sit on a 1/64 grid: bf16 logits of magnitude 2-32 have steps 1/64..1/8
    on_grid = np.mean(np.isclose(y * 64, np.round(y * 64), atol=1e-6))
    assert on_grid < 0.2

    torch.set_grad_enabled(False)  # restored below
    adapter = pair.it_adapter
    final = torch.randn(8, adapter.d_model).to(torch.bfloat16) * 4
    tokens = torch.randint(0, 500, (8, 2))
    h_bf16 = adapter.final_norm(final)  # the old computation: all in bf16
    logits_bf16 = torch.einsum("bd,bkd->bk", h_bf16, adapter.unembed.weight[tokens]).float()
    y_bf16 = (logits_bf16[:, 0] - logits_bf16[:, 1]).numpy()
    assert np.mean(np.isclose(y_bf16 * 64, np.round(y_bf16 * 64), atol=1e-6)) == 1.0
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


def test_fp32_readout_drifts_less_from_the_fp32_run_than_a_bf16_readout() -> None:
    """The drift report's claim on a tiny pair with real logit magnitudes: score the fp32 run's events with
    the weights cast to bf16; the engine's fp32 readout is closer to the fp32 run's interactions (mean
    per-event |dI|) than the old bf16 readout (norm and columns in bf16, computed here by hand)."""
    import copy

    from crosspatch.engine.crosspatch import CELLS, clean_passes, event_batches, late_stack_final
    from crosspatch.engine.pairs import ModelPair

    pair32 = tiny_pair("llama", it_scale=0.05)
    with torch.no_grad():
        for adapter in (pair32.pt_adapter, pair32.it_adapter):
            adapter.final_norm.weight.mul_(7.0)  # median top-1 logit ~25, where bf16's step is 1/8
    events = [e for e in find_divergences(pair32, random_prompts(48, seed=5), max_new_tokens=8) if e.diverged]
    assert len(events) >= 24
    ref = crosspatch(pair32, events, boundary=3).column("interaction").to_numpy()  # sorted by prompt id
    pair16 = ModelPair.from_models(
        copy.deepcopy(pair32.pt).to(torch.bfloat16),
        copy.deepcopy(pair32.it).to(torch.bfloat16),
        pair32.tokenizer,
        family="llama",
        pair_id="tiny-llama-bf16",
    )
    fp32_readout = crosspatch(pair16, events, boundary=3).column("interaction").to_numpy()

    def old_margin(adapter, h, tokens):  # the computation before fp32 readout: all in the weights' dtype
        logits = torch.einsum("bd,bkd->bk", adapter.final_norm(h), adapter.unembed.weight[tokens]).float()
        return (logits[:, 0] - logits[:, 1]).double()

    old: dict[str, float] = {}
    with torch.no_grad():
        for batch, ids, mask, tokens in event_batches(pair16, events, 16):
            passes = clean_passes(pair16, ids, mask, [3])
            y = {
                col: old_margin(pair16.it_adapter, late_stack_final(pair16, up, late, passes, 3), tokens)
                for (up, late), col in CELLS.items()
            }
            inter = (y["y_itup_itlate"] - y["y_itup_ptlate"]) - (y["y_ptup_itlate"] - y["y_ptup_ptlate"])
            old |= {e.prompt_id: v for e, v in zip(batch, inter.tolist(), strict=True)}
    bf16_readout = np.array([old[k] for k in sorted(old)])
    drift_fp32 = np.abs(fp32_readout - ref).mean()
    drift_bf16 = np.abs(bf16_readout - ref).mean()
    # measured: 0.185 vs 0.213 (the rest of the drift is the bf16 blocks, common to both readouts)
    assert drift_fp32 < drift_bf16
