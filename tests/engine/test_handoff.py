"""The handoff chain (method §5.4, §5.5) on the `mediated` organisms, whose answers follow from the weights.

`mediated`: IT's block 0 writes u; block 4 holds 4 planted neurons (one per class) gated on u that write toward
t_IT along known unit directions. So the planted latents fire only under IT upstream, ablating them removes
the upstream-dependent effect, and grafting IT's block-0 MLP (the early window) into PT's upstream hands the
effect off through them. A variant adds an always-on push toward t_IT in block 2 (the mid window), which
changes the margin without touching the planted latents.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.handoff import HandoffConfig, default_windows, feature_upstream_table
from crosspatch.engine.mediation import DirectionDictionary, MediationConfig, mediate
from crosspatch.engine.organisms import constructed as cons
from crosspatch.engine.organisms import load_expected, organism_path
from crosspatch.engine.organisms.tokenizer import build_tokenizer
from crosspatch.engine.pairs import ModelPair, load_pair
from crosspatch.engine.prompts import load_prompts

N_EVENTS = 16  # a subsample keeps the run to a few seconds; every quantity below is large or exact


def _setup(name: str):
    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it", family=name.split("_")[0], pair_id=name)
    events = [e for e in find_divergences(pair, load_prompts(root / "prompts.jsonl")) if e.diverged][
        :N_EVENTS
    ]
    expected = load_expected(name)
    med = expected["mediators"]
    planted = torch.tensor(med["directions"], dtype=torch.float32)  # [4, d_model]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(60, planted.shape[1], generator=g)
    noise[:, : expected["background"]["identity_start"]] = 0  # the organism's noise subspace (token identity)
    d = DirectionDictionary(
        "oracle", med["layer"], torch.cat([planted, noise / noise.norm(dim=-1, keepdim=True)])
    )
    return pair, events, d


def _cfg(**handoff) -> MediationConfig:
    return MediationConfig(
        top_k=4,
        ks=(4,),
        features=tuple(("oracle", i) for i in range(4)),  # the planted latents
        n_resamples=300,
        neighbours=10,
        n_single_features=0,
        batch_size=64,
        handoff=HandoffConfig(**handoff),
    )


def _rows(table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def _one(table, **where) -> dict:
    (row,) = _rows(table, **where)
    return row


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_mediated", "qwen3_mediated"])
def test_handoff_chain_on_the_mediated_organism(name):
    pair, events, d = _setup(name)
    res = mediate(pair, events, [d], _cfg(alphas=(0.0, 0.5, 1.0, 1.5, 2.0)))
    h = res.handoff
    t = h.table
    # windows scaled to L = 5 with b = 3 and the terminal boundary t = 4 (the dictionary's layer)
    assert (h.boundary, h.terminal) == (3, 4)
    assert h.windows == {
        "early": (0, 2),
        "mid": (2, 4),
        "late_preterminal": (3, 4),
        "midlate_preterminal": (2, 4),
        "terminal_entry": None,
    }
    # feature activation under each upstream (IT late stack, held-out events): planted latents fire only
    # under IT upstream (u gates them: silu(0) = 0 under PT upstream)
    n = {(pair.pair_id, "test"): len(res.test_ids), (pair.pair_id, "fit"): len(res.fit_ids)}
    up = {r["latent"]: r for r in _rows(feature_upstream_table(res.feature_acts, n), split="test")}
    for latent in range(4):
        assert up[latent]["mean_act_ptup"] == 0.0 and up[latent]["mean_act_itup"] > 0.3
        assert up[latent]["n"] == len(res.test_ids)
    planted_total = sum(up[i]["diff"] for i in range(4))
    assert planted_total > 5.0 and all(abs(r["diff"]) < 0.05 for i, r in up.items() if i >= 4)
    # gate on its own support (every event: the interaction is planted and positive)
    assert _one(t, analysis="gate", statistic="support_fraction")["effect"] == 1.0
    gate = _one(t, analysis="gate", set_kind="topk", statistic="gate")
    interaction = _one(t, analysis="gate", set_kind="none", statistic="interaction")
    assert (
        gate["effect"] > 10.0 and abs(gate["effect"] - interaction["effect"]) < 0.05 * interaction["effect"]
    )
    assert abs(_one(t, analysis="gate", set_kind="topk", statistic="drop_ptup")["effect"]) < 1e-4
    for kind in ("matched_random", "top_active_noncausal"):
        assert abs(_one(t, analysis="gate", set_kind=kind, statistic="gate")["effect"]) < 0.05
        assert _one(t, analysis="gate", set_kind=kind, statistic="gate_excess")["ci_low"] > 10.0
    # rescue dose-response: exact at 0, monotone, ~100% at 1
    assert h.alpha0_max_abs_diff == 0.0
    gains = {r["alpha"]: r for r in _rows(t, analysis="dose", set_kind="topk", statistic="rescue_gain")}
    assert gains[0.0]["effect"] == 0.0 and gains[0.0]["ci_low"] == gains[0.0]["ci_high"] == 0.0
    curve = [gains[a]["effect"] for a in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert all(x < y for x, y in itertools.pairwise(curve))
    frac1 = _one(t, analysis="dose", alpha=1.0, set_kind="topk", statistic="rescue_fraction")["effect"]
    assert 0.9 <= frac1 <= 1.1
    for kind in ("matched_random", "top_active_noncausal"):
        assert (
            abs(_one(t, analysis="dose", alpha=1.0, set_kind=kind, statistic="rescue_fraction")["effect"])
            < 0.02
        )
    # handoff: the early window (IT's block 0 writes u) hands the effect off through the planted latents,
    # in both directions; the windows above block 0 change nothing (IT = PT there): no finite denominator
    for analysis in ("rescue_graft", "degrade_graft"):
        early = _one(
            t, analysis=analysis, window_name="early", set_kind="topk", statistic="mediated_fraction"
        )
        assert early["effect"] > 0.9 and early["n"] == len(res.test_ids)
        for kind in ("matched_random", "same_delta_random", "top_active_noncausal"):
            excess = _one(
                t, analysis=analysis, window_name="early", set_kind=kind, statistic="mediated_excess"
            )
            assert excess["ci_low"] > 5.0
        for window in ("mid", "late_preterminal", "midlate_preterminal"):
            assert (
                _one(t, analysis=analysis, window_name=window, set_kind="none", statistic="total")["effect"]
                == 0.0
            )
            frac = _one(
                t, analysis=analysis, window_name=window, set_kind="topk", statistic="mediated_fraction"
            )
            assert frac["effect"] is None and frac["n"] == 0
        entry = _one(t, analysis=analysis, window_name="terminal_entry", set_kind="none", statistic="total")
        assert entry["window_stop"] == 4 and entry["effect"] > 10.0


@pytest.mark.slow
def test_a_window_that_does_not_write_the_features_mediates_nothing():
    _, events, d = _setup("llama_mediated")
    con = cons.make_construction("mediated", "llama", 0)
    push = [
        cons.Neuron(2, j, gate={cons.CONST: 2.0}, up={cons.C[j]: 1.0}, down={cons.K[j]: 0.15})
        for j in range(cons.N_CLASSES)
    ]  # block 2 (the mid window): an always-on push toward t_IT that no planted latent reads
    pt, it = cons.build_models(con, con.it_neurons + push)
    variant = ModelPair.from_models(pt, it, build_tokenizer(), family="llama", pair_id="mediated_mid_push")
    res = mediate(variant, events, [d], _cfg(alphas=(0.0,), windows={"mid": (2, 4)}))
    t = res.handoff.table
    # rescue: IT's block-2 MLP on PT's upstream moves the margin, but without u no planted latent fires
    total = _one(t, analysis="rescue_graft", window_name="mid", set_kind="none", statistic="total")
    assert total["ci_low"] > 0.5
    mid = _one(t, analysis="rescue_graft", window_name="mid", set_kind="topk", statistic="mediated_fraction")
    assert abs(mid["effect"]) < 1e-6 and mid["n"] == len(res.test_ids)
    # degradation is not as clean: removing the push from IT's own pass also rescales the residual the
    # planted latents read (RMSNorm), so part of its change runs through them; the terminal entry, where
    # u itself is swapped, goes through them almost entirely
    entry = _one(
        t,
        analysis="degrade_graft",
        window_name="terminal_entry",
        set_kind="topk",
        statistic="mediated_fraction",
    )
    assert entry["effect"] > 0.8


def test_windows_and_bad_inputs():
    # Llama-8B depth: the method's early (0, 13), late boundary 19, final-3 dictionaries from 29
    assert default_windows(32, 19, 29) == {
        "early": (0, 13),
        "mid": (10, 22),
        "late_preterminal": (19, 29),
        "midlate_preterminal": (10, 29),
    }
    assert default_windows(5, 3, 3) == {"early": (0, 2), "mid": (2, 3), "midlate_preterminal": (2, 3)}
    with pytest.raises(CrosspatchError, match="must include 0"):
        HandoffConfig(alphas=(0.5, 1.0)).validate()
    with pytest.raises(CrosspatchError, match="start < stop"):
        HandoffConfig(windows={"w": (3, 3)}).validate()
    with pytest.raises(CrosspatchError, match="positive number"):
        HandoffConfig(min_denominator=0.0).validate()
