"""Feature mediation on planted organisms (known answers) and the splice no-op per family."""

from __future__ import annotations

import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.mediation import DirectionDictionary, MediationConfig, mediate, splice
from crosspatch.engine.organisms import load_expected, organism_path
from crosspatch.engine.organisms.tiny import FAMILIES
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts


def _random_dictionary(
    d_model: int, layer: int, n: int = 32, seed: int = 0, zero_first: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d_model, generator=g)
    rows[:, :zero_first] = 0
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_splice_without_intervention_reproduces_clean_logits(family):
    pair = tiny_pair(family)
    a = pair.it_adapter
    d = DirectionDictionary("rand", a.n_layers - 1, _random_dictionary(a.d_model, a.n_layers - 1))
    ids = torch.tensor([pair.tokenizer.encode(p.text) for p in random_prompts(3, min_len=6, max_len=6)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        clean = a.forward_logits(ids, mask)
        with splice(
            a, [d, DirectionDictionary("rand2", a.n_layers - 2, _random_dictionary(a.d_model, 0, seed=1))]
        ):
            spliced = a.forward_logits(ids, mask)
    assert (spliced - clean).abs().max().item() <= 1e-5
    assert not torch.equal(d.decode(d.encode(torch.randn(4, a.d_model))), torch.zeros(4, a.d_model))


def _organism(name):
    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it", family=name.split("_")[0], pair_id=name)
    events = find_divergences(pair, load_prompts(root / "prompts.jsonl"))
    return pair, events, load_expected(name)


def _oracle(planted: torch.Tensor, layer: int, d_model: int) -> DirectionDictionary:
    """The planted directions plus 60 random latents in the organism's noise subspace (coordinates 16+)."""
    noise = _random_dictionary(d_model, layer, n=60, seed=3, zero_first=16)
    return DirectionDictionary("oracle", layer, torch.cat([planted, noise]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_mediated", "qwen3_mediated"])
def test_mediated_organism_planted_features_carry_the_interaction(name):
    pair, events, expected = _organism(name)
    med = expected["mediators"]
    planted = torch.tensor(med["directions"], dtype=torch.float32)
    d = _oracle(planted, med["layer"], pair.it_adapter.d_model)
    k = len(planted)
    res = mediate(pair, events, [d], MediationConfig(top_k=k, ks=(k,), n_resamples=500))
    assert sorted(res.ranking.top(k)) == list(range(k))  # the planted latents rank first
    eff = {(r["intervention"], r["statistic"]): r for r in res.effects.to_pylist() if r["k"] == k}
    share = eff[("ablate_topk", "share")]
    assert share["effect"] >= 0.8 and eff[("ablate_topk", "interaction_drop")]["ci_low"] > 0
    assert abs(eff[("ablate_matched_random", "share")]["effect"]) < 0.1
    assert eff[("rescue_topk", "rescue_fraction")]["effect"] >= 0.8
    assert abs(eff[("rescue_matched_random", "rescue_fraction")]["effect"]) < 0.1
    # the split is seeded and recorded, disjoint and complete
    assert set(res.fit_ids).isdisjoint(res.test_ids)
    assert len(res.fit_ids) + len(res.test_ids) == sum(e.diverged for e in events)
    assert set(res.feature_acts["split"].to_pylist()) == {"fit", "test"}


@pytest.mark.slow
def test_self_contained_late_bias_has_no_interaction_to_remove():
    pair, events, _ = _organism("llama_self_contained")
    # the planted late neurons write along the answer-word axes K[j] = coordinates 4..7
    planted = torch.eye(pair.it_adapter.d_model)[4:8]
    d = _oracle(planted, pair.n_layers - 1, pair.it_adapter.d_model)
    cfg = MediationConfig(
        top_k=4, ks=(4,), n_resamples=300, n_random_seeds=1, features=tuple(("oracle", i) for i in range(4))
    )
    res = mediate(pair, events, [d], cfg)
    eff = {(r["intervention"], r["statistic"]): r for r in res.effects.to_pylist() if r["k"] == 4}
    baseline = {r["statistic"]: r for r in res.effects.to_pylist() if r["intervention"] == "baseline"}
    assert abs(baseline["interaction"]["effect"]) < 1e-3
    # ablating the planted late features removes the late effect itself in both IT-late cells ...
    assert eff[("ablate_topk", "it_late_drop")]["effect"] > 5.0
    # ... but no interaction: there was none to remove
    assert abs(eff[("ablate_topk", "interaction_drop")]["effect"]) < 0.05


def test_bad_inputs():
    pair = tiny_pair("llama", it_scale=0.05)
    events = find_divergences(pair, random_prompts(12), max_new_tokens=4)
    early = DirectionDictionary("early", 0, _random_dictionary(64, 0))
    with pytest.raises(CrosspatchError, match="outside the late stack"):
        mediate(pair, events, [early])
    late = DirectionDictionary("late", 4, _random_dictionary(64, 4, n=8))
    with pytest.raises(CrosspatchError, match="exceeds"):
        mediate(pair, events, [late], MediationConfig(top_k=9))
    with pytest.raises(CrosspatchError, match="at least 4 diverged"):
        mediate(pair, events[:0], [late], MediationConfig(top_k=2, ks=(2,)))
    with pytest.raises(CrosspatchError, match="at least one dictionary"):
        mediate(pair, events, [])
