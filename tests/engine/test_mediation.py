"""Feature mediation on planted organisms (known answers) and the splice no-op per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.controls import control_pool, matched_status, random_directions
from crosspatch.engine.divergence import DivergenceEvent, find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.mediation import (
    DirectionDictionary,
    FeatureRanking,
    MediationConfig,
    _labelled_sets,
    mediate,
    splice_with_error,
    split_events,
)
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
        with splice_with_error(
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
    res = mediate(pair, events, [d], MediationConfig(top_k=k, ks=(k,), n_resamples=500, neighbours=10))
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
        top_k=4, ks=(4,), n_resamples=300, neighbours=10, features=tuple(("oracle", i) for i in range(4))
    )
    res = mediate(pair, events, [d], cfg)
    eff = {(r["intervention"], r["statistic"]): r for r in res.effects.to_pylist() if r["k"] == 4}
    baseline = {r["statistic"]: r for r in res.effects.to_pylist() if r["intervention"] == "baseline"}
    assert abs(baseline["interaction"]["effect"]) < 1e-3
    # ablating the planted late features removes the late effect itself in both IT-late cells ...
    assert eff[("ablate_topk", "it_late_drop")]["effect"] > 5.0
    # ... but no interaction: there was none to remove
    assert abs(eff[("ablate_topk", "interaction_drop")]["effect"]) < 0.05
    # and a share of an interaction whose CI covers 0 is not a number: null, with its CI
    lo, hi = baseline["interaction"]["ci_low"], baseline["interaction"]["ci_high"]
    assert lo <= 0.0 <= hi
    shares = [r for r in res.effects.to_pylist() if r["statistic"] == "share"]
    assert shares and all(r["effect"] is None and r["ci_low"] is None for r in shares)


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


@pytest.mark.slow
def test_matched_random_never_draws_a_planted_latent_and_removes_nothing():
    """llama_mediated: 4 planted mediators; at every k, 5 seeds of matched-random sets avoid all of them."""
    pair, events, expected = _organism("llama_mediated")
    med = expected["mediators"]
    planted = torch.tensor(med["directions"], dtype=torch.float32)
    d = _oracle(planted, med["layer"], pair.it_adapter.d_model)
    cfg = MediationConfig(top_k=4, ks=(1, 2, 3, 4), n_resamples=200, neighbours=10, batch_size=64)
    res = mediate(pair, events, [d], cfg)
    assert [lab["size"] for lab in res.k_labels] == [1, 2, 3, 4]
    drawn = {key: feats for key, feats in res.sets.items() if key[0] == "matched_random"}
    assert sorted({(k, s) for _, k, s in drawn}) == [(k, s) for k in (1, 2, 3, 4) for s in range(5)]
    for (_, k, _s), feats in drawn.items():
        assert len(feats) == k and len(set(feats)) == k
        assert all(latent >= 4 for _, latent in feats), feats  # oracle latents 0..3 are the planted ones
    # the draws are recorded per size and seed (provenance of a job): exactly the sets ablated
    by_k = res.controls["matched_random"]["by_k"]
    assert all(by_k[k]["drawn"][s] == feats for (_, k, s), feats in drawn.items())
    # the pool: not the largest top set, no positive score, fired on the fit split
    score = dict(zip(res.ranking.keys, res.ranking.score, strict=True))
    assert all(score[f] <= 0 for feats in drawn.values() for f in feats)
    assert res.controls["matched_random"]["excluded"]["largest_top_set"] == 4
    rows = {
        (r["intervention"], r["statistic"], r["k"]): r for r in res.effects.to_pylist() if r["latent"] is None
    }
    interaction = rows[("baseline", "interaction", 0)]["effect"]
    for k in (1, 2, 3, 4):
        drop = rows[("ablate_matched_random", "interaction_drop", k)]["effect"]
        assert abs(drop) <= 0.05 * abs(interaction), (k, drop, interaction)
        assert abs(rows[("ablate_matched_random", "share", k)]["effect"]) <= 0.05
    assert rows[("ablate_topk", "share", 4)]["effect"] >= 0.8
    # the causal gate checks, by name, measured at the largest set
    checks = {c["name"]: c for c in res.checks}
    assert checks["topk_causal_drop"]["passed"] and checks["topk_causal_drop"]["k"] == 4
    assert checks["topk_causal_drop"]["value"] == pytest.approx(
        rows[("ablate_topk", "interaction_drop", 4)]["effect"]
    )
    assert checks["matched_random_drop"]["passed"]
    assert checks["matched_random_drop"]["value"] == pytest.approx(
        rows[("ablate_matched_random", "interaction_drop", 4)]["effect"]
    )
    table = res.checks_table(pair).to_pylist()
    assert {(r["dictionary_id"], r["check_name"], r["passed"]) for r in table} == {
        ("oracle", "topk_causal_drop", True),
        ("oracle", "matched_random_drop", True),
    }
    # held-out single-feature ablations: each planted latent fires for its own answer word only, so the
    # four single drops add up to the top-4 drop, event by event
    single = {r["latent"]: r for r in res.effects.to_pylist() if r["intervention"] == "ablate_single"}
    assert sorted(single) == [0, 1, 2, 3]
    assert all(
        r["effect"] > 0 and r["n"] == len(res.test_ids) and r["layer"] == med["layer"]
        for r in single.values()
    )
    total = sum(r["effect"] for r in single.values())
    assert total == pytest.approx(rows[("ablate_topk", "interaction_drop", 4)]["effect"], rel=1e-3)
    assert sorted(r["k"] for r in single.values()) == [1, 2, 3, 4]  # their attribution ranks
    assert not any(r["statistic"] == "gate" for r in res.effects.to_pylist())


@pytest.mark.slow
def test_a_pool_too_small_reports_the_matched_control_unavailable():
    pair, events, expected = _organism("llama_mediated")
    med = expected["mediators"]
    d = _oracle(torch.tensor(med["directions"], dtype=torch.float32), med["layer"], pair.it_adapter.d_model)
    res = mediate(
        pair, events, [d], MediationConfig(top_k=4, ks=(4,), n_resamples=200, neighbours=1000, batch_size=64)
    )
    status = res.controls["matched_random"]["by_k"][4]
    assert (
        not status["available"] and "pool too small" in status["reason"] and "needs 1003" in status["reason"]
    )
    assert not any(key[0] == "matched_random" for key in res.sets)
    rows = [r for r in res.effects.to_pylist() if r["intervention"].endswith("matched_random")]
    assert {r["statistic"] for r in rows} == {
        "interaction_drop",
        "share",
        "it_late_drop",
        "rescue_gain",
        "rescue_fraction",
    }
    assert all(r["effect"] is None and r["ci_low"] is None and r["n"] == 0 for r in rows)
    check = next(c for c in res.checks if c["name"] == "matched_random_drop")
    assert check["value"] is None and check["passed"] is False and "unavailable" in check["detail"]
    # the same-delta control does not depend on the pool: 5 seeds, measured
    assert len(res.controls["same_delta_random"]["seeds"][4]) == 5
    sd = next(
        r
        for r in res.effects.to_pylist()
        if r["intervention"] == "ablate_same_delta_random" and r["statistic"] == "interaction_drop"
    )
    assert sd["effect"] is not None and sd["n"] == len(res.test_ids)


def test_random_directions_are_independent_per_event_and_seed_and_batch_free():
    ids = [f"p{i}" for i in range(6)]
    r = random_directions(ids, seed=11, layer=4, d_model=64)  # [6, 64]
    assert r.shape == (6, 64) and torch.allclose(r.norm(dim=-1), torch.ones(6))
    cos = r @ r.T
    assert (cos - torch.eye(6)).abs().max() < 0.6  # no two events share a direction
    # a function of (seed, prompt id, layer) only: the same in another batch, different for other seeds/layers
    again = random_directions(["p3", "x", "p0"], seed=11, layer=4, d_model=64)
    assert torch.equal(again[0], r[3]) and torch.equal(again[2], r[0])
    seeds = torch.stack([random_directions(["p0"], seed=s, layer=4, d_model=64)[0] for s in range(5)])
    assert ((seeds @ seeds.T) - torch.eye(5)).abs().max() < 0.6
    assert not torch.equal(random_directions(["p0"], seed=11, layer=3, d_model=64), r[:1])


def test_sets_are_labelled_by_their_real_size():
    keys = [("d", i) for i in range(6)]
    score = np.array([3.0, 2.0, 1.0, -1.0, 0.0, -2.0])
    ranking = FeatureRanking(keys=keys, score=score, active_rate=np.full(6, 0.5), n_events=10)
    sets, labels = _labelled_sets(ranking, MediationConfig(top_k=5, ks=(2, 4, 5)))
    assert labels == [{"requested": 2, "size": 2}, {"requested": 4, "size": 3}, {"requested": 5, "size": 3}]
    assert sets == {2: [0, 1], 3: [0, 1, 2]}
    pool = control_pool(keys, score, np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.5]), sets[3])
    assert pool.by_dict == {"d": [3, 5]}  # 4 never fired; 0..2 are the largest set
    assert (pool.excluded_top, pool.excluded_positive, pool.excluded_silent) == (3, 0, 1)
    assert matched_status(keys, [0, 1], pool, neighbours=1, k=2).available
    assert not matched_status(keys, [0, 1], pool, neighbours=2, k=2).available  # second draw: 1 left
    with pytest.raises(CrosspatchError, match="n_random_seeds 3 must be >= 5"):
        MediationConfig(n_random_seeds=3).validate(
            [DirectionDictionary("x", 4, torch.eye(4))], tiny_pair("llama")
        )


def test_fit_split_meets_every_it_token_in_proportion():
    """`split_events` stratifies by t_IT: 4 tokens x 12 events, fit 13 -> 3 or 4 of each; plain otherwise."""

    def event(i: int, t_it: int) -> DivergenceEvent:
        return DivergenceEvent(f"p{i:03d}", "c", [1], diverged=True, position=0, t_pt=5, t_it=t_it)

    events = [event(i, 10 + i % 4) for i in range(48)] + [DivergenceEvent("x", "c", [1])]  # + one not scored
    for seed in range(20):
        fit, test = split_events(events, 0.27, seed)
        assert len(fit) == 13 and len(test) == 35  # round(0.27 x 48); the unscored event is in neither
        assert {e.prompt_id for e in fit}.isdisjoint(e.prompt_id for e in test)
        counts = sorted(sum(e.t_it == t for e in fit) for t in range(10, 14))
        assert counts == [3, 3, 3, 4]
    assert split_events(events, 0.27, 3) == split_events(events, 0.27, 3)  # seeded
    assert split_events(events, 0.27, 3)[0] != split_events(events, 0.27, 4)[0]
    distinct = [event(i, 100 + i) for i in range(40)]  # all-distinct tokens: a plain seeded random split
    fits = [frozenset(e.prompt_id for e in split_events(distinct, 0.25, s)[0]) for s in range(30)]
    assert all(len(f) == 10 for f in fits) and len(set(fits)) == 30
    assert set().union(*fits) == {e.prompt_id for e in distinct}  # every event can land in fit
    with pytest.raises(CrosspatchError, match="at least 4"):
        split_events(distinct[:3], 0.27, 0)
