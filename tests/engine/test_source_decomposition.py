"""Source decomposition (method 4.8, our reading) on `llama_upstream_dependent`, whose upstream mechanism is
one MLP neuron (block 0 writes u); embeddings and attention weights are the same in PT and IT."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from crosspatch.engine.control_schemas import SOURCE_DECOMPOSITION_EVENTS_SCHEMA, SOURCE_DECOMPOSITION_SCHEMA
from crosspatch.engine.control_suite import format_controls
from crosspatch.engine.crosspatch import clean_passes, crosspatch, event_batches
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.hooks import mlp_hooks
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.organisms.tiny import FAMILIES, forced_events, random_prompts, tiny_pair
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.source_decomposition import source_decomposition, upstream_sources

N_PROMPTS = 8


@functools.cache
def _run():
    root = organism_path("llama_upstream_dependent")
    pair = load_pair(root / "pt", root / "it")
    events = [
        e for e in find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=N_PROMPTS)) if e.diverged
    ]
    per_event, summary = source_decomposition(pair, events, batch_size=4, n_resamples=200)
    assert per_event.schema == SOURCE_DECOMPOSITION_EVENTS_SCHEMA
    assert summary.schema == SOURCE_DECOMPOSITION_SCHEMA
    return pair, events, per_event, {(r["source"], r["statistic"]): r for r in summary.to_pylist()}, summary


def test_sources_reconstruct_the_boundary_difference_exactly() -> None:
    """embedding + attention + mlp = h_IT - h_PT at every position (float64 of the models' own passes), and
    the 'mlp' part is the MLP modules' own outputs summed (a Llama block has no post-norm)."""
    pair, events, per_event, rows, _ = _run()
    assert max(per_event.column("reconstruction_error").to_pylist()) <= 1e-9
    assert rows[("all", "reconstruction_error")]["estimate"] <= 1e-9
    _, ids, mask, _ = next(event_batches(pair, events, 4))
    parts, h_b, _ = upstream_sources(pair, "it", ids, mask, 3)
    outputs: list[torch.Tensor] = []
    with mlp_hooks(pair.it_adapter, {layer: lambda _x, out: outputs.append(out) for layer in range(3)}):
        pair.it_adapter.forward_logits(ids, mask)
    assert torch.allclose(parts["mlp"], sum(o.double() for o in outputs), atol=1e-5)
    assert torch.allclose(parts["embedding"] + parts["attention"] + parts["mlp"], h_b, atol=1e-9)


def test_the_interaction_sits_in_the_source_that_holds_the_mechanism() -> None:
    """Only u (an MLP write) gates the late neurons: the MLP source carries the whole interaction; the
    embedding difference is exactly 0 and the attention difference (noise weights on the identity axes,
    which no late plant reads) leaves both late stacks equal, so their interactions are exactly 0."""
    pair, events, per_event, rows, summary = _run()
    cells = crosspatch(pair, events, check_noop=False)
    assert rows[("all", "interaction")]["estimate"] == pytest.approx(
        float(np.mean(cells.column("interaction").to_numpy())), abs=1e-6
    )
    for source in ("embedding", "attention"):
        assert [r["interaction"] for r in per_event.to_pylist() if r["source"] == source] == [0.0] * N_PROMPTS
        assert rows[(source, "share")]["estimate"] == 0.0
    assert [r["diff_norm"] for r in per_event.to_pylist() if r["source"] == "embedding"] == [0.0] * N_PROMPTS
    mlp = rows[("mlp", "share")]
    assert mlp["estimate"] == pytest.approx(1.0, abs=2e-3) and mlp["ci_low"] > 0.99
    assert abs(rows[("all", "non_additivity")]["estimate"]) < 0.01 * rows[("all", "interaction")]["estimate"]
    assert "mlp share" in format_controls({"source_decomposition": summary})


@pytest.mark.parametrize("family", FAMILIES)
def test_decomposition_is_exact_in_every_family(family: str) -> None:
    """Tiny random pairs (post-norm blocks in OLMo2 and Gemma3, GPT-2's LayerNorm, left padding): the sources
    sum to the boundary difference, the block runs are the clean pass's, and 'all' is the 2x2 interaction."""
    pair = tiny_pair(family)
    events = forced_events(pair, random_prompts(4, seed=1))
    per_event = source_decomposition(pair, events, batch_size=2, n_resamples=50)[0]
    assert max(per_event.column("reconstruction_error").to_pylist()) <= 1e-9
    _, ids, mask, _ = next(event_batches(pair, events, 2))
    passes = upstream_sources(pair, "it", ids, mask, pair.default_boundary)[2]
    clean = clean_passes(pair, ids, mask, [pair.default_boundary])
    assert torch.equal(
        passes.captured["it"][pair.default_boundary], clean.captured["it"][pair.default_boundary]
    )
    assert torch.equal(passes.final["it"], clean.final["it"])
    cells = crosspatch(pair, events, check_noop=False).sort_by("prompt_id")
    full = sorted((r for r in per_event.to_pylist() if r["source"] == "all"), key=lambda r: r["prompt_id"])
    np.testing.assert_allclose(
        [r["interaction"] for r in full], cells.column("interaction").to_numpy(), atol=1e-5
    )
    same = tiny_pair(family, it_scale=0.0)  # IT == PT: no difference anywhere, every interaction exactly 0
    rows = source_decomposition(same, events, batch_size=4, n_resamples=50)[0].to_pylist()
    assert all(r["interaction"] == 0.0 and r["diff_norm"] == 0.0 for r in rows)
