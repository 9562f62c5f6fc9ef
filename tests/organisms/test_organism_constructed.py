"""Constructed organisms: the engine's measurements land where the construction says they must."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from organism_reference import reference_cells

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.organisms import CONSTRUCTED
from crosspatch.engine.organisms import constructed as cons
from crosspatch.engine.pairs import ModelPair, load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.stats import bootstrap_ci

QUANTITIES = (
    "y_ptup_ptlate",
    "y_ptup_itlate",
    "y_itup_ptlate",
    "y_itup_itlate",
    "pt_late_effect",
    "it_late_effect",
    "interaction",
)
N_PROMPTS = 24  # enough for every divergence position and a stable mean; keeps the suite fast


@functools.cache
def _run(root: Path) -> tuple[ModelPair, list, dict, dict]:
    """Pair, (prompt, event) rows, common-IT cells table and expected.json; cached per organism."""
    pair = load_pair(root / "pt", root / "it")
    prompts = load_prompts(root / "prompts.jsonl", limit=N_PROMPTS)
    events = find_divergences(pair, prompts, max_new_tokens=16)
    table = crosspatch(pair, [e for e in events if e.diverged]).to_pydict()
    expected = json.loads((root / "expected.json").read_text())
    return pair, list(zip(prompts, events, strict=True)), table, expected


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_every_prompt_diverges_where_the_construction_says(built, name: str) -> None:
    pair, rows, _, _ = _run(built(name))
    tok = pair.tokenizer
    for prompt, event in rows:
        assert event.diverged, (prompt.id, event.reason)
        assert event.position == prompt.meta["expected_position"], prompt.id
        assert tok.convert_ids_to_tokens(event.t_it) == prompt.meta["expected_t_it"], prompt.id
        assert tok.convert_ids_to_tokens(event.t_pt) == prompt.meta["expected_t_pt"], prompt.id
    if pair.family != "gpt2":  # gated organisms fire only on classed words: positions vary
        assert len({event.position for _, event in rows}) > 1


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_two_by_two_within_expected_bounds(built, name: str) -> None:
    pair, _, table, expected = _run(built(name))
    assert pair.default_boundary == expected["boundary"]
    assert set(table["boundary"]) == {expected["boundary"]} and set(table["readout"]) == {"it"}
    for q in QUANTITIES:
        band = expected["cells"][q]
        mean, _, _ = bootstrap_ci(table[q])
        assert band["lo"] <= mean <= band["hi"], (q, mean, band)
    _, lo, hi = bootstrap_ci(table["interaction"])
    if expected["interaction_ci"] == "excludes_zero":
        assert lo > 0, (lo, hi)
    else:
        assert lo <= 0 <= hi, (lo, hi)
    pt_up, it_up = (bootstrap_ci(table[q])[0] for q in ("pt_late_effect", "it_late_effect"))
    if expected["construction"] == "self_contained":  # fully portable late effect
        assert pt_up == pytest.approx(it_up, abs=1e-4) and pt_up > 1.0
    if expected["construction"] in ("upstream_dependent", "mediated"):
        assert abs(pt_up) < 1e-4 and it_up > 1.0


@pytest.mark.parametrize("family", cons.CONSTRUCTED_FAMILIES)
def test_engine_matches_hook_reference(built, family: str) -> None:
    pair, rows, table, expected = _run(built(f"{family}_upstream_dependent"))
    by_id = {pid: i for i, pid in enumerate(table["prompt_id"])}
    for _, event in rows[:4]:
        ref = reference_cells(pair.pt, pair.it, event.input_ids, event.t_pt, event.t_it, expected["boundary"])
        i = by_id[event.prompt_id]
        for q in QUANTITIES:
            assert table[q][i] == pytest.approx(ref[q], abs=1e-4), q


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_noise_free_model_reproduces_nominal_exactly(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """With the noise weights at zero the model computes exactly what `nominal_cells` derives."""
    monkeypatch.setattr(cons, "NOISE_STD", 0.0)
    con = cons.make_construction(*CONSTRUCTED[name], seed=0)
    pt, it = cons.build_models(con)
    word = next(iter(con.word_class))
    j = con.word_class[word]
    ids = [1, *list(con.succ)[:3], word]
    ref = reference_cells(pt, it, ids, con.succ[word], con.answer_ids[j], cons.BOUNDARY)
    nominal = cons.nominal_cells(con, word=word)  # the word's own class (and group value, `mediated`)
    for q in QUANTITIES:
        assert ref[q] == pytest.approx(nominal[q], abs=1e-4), q


MEDIATED_FAMILIES = [f for f in cons.CONSTRUCTED_FAMILIES if "mediated" in cons.FAMILY_KINDS[f]]


@pytest.mark.parametrize("family", MEDIATED_FAMILIES)
def test_mediators_carry_the_interaction(built, family: str) -> None:
    """Recorded decoder directions are the IT final MLP's columns; ablating them removes the interaction."""
    root = built(f"{family}_mediated")
    pair, rows, _, expected = _run(root)
    med = expected["mediators"]
    down = pair.it.model.layers[med["layer"]].mlp.down_proj.weight  # [d_model, d_mlp]
    for neuron, direction in zip(med["neurons"], med["directions"], strict=True):
        col = down[:, neuron] / down[:, neuron].norm()
        assert torch.allclose(col, torch.tensor(direction, dtype=col.dtype), atol=1e-6)
    full, ablated = [], []
    for _, event in rows[:12]:
        args = (pair.pt, pair.it, event.input_ids, event.t_pt, event.t_it, expected["boundary"])
        full.append(reference_cells(*args)["interaction"])
        ablated.append(reference_cells(*args, it_late_ablation=(med["layer"], med["neurons"]))["interaction"])
    i_full, i_ablate = sum(full) / len(full), sum(ablated) / len(ablated)
    assert i_ablate == pytest.approx(med["interaction_after_ablation"], abs=1e-3)
    assert (i_full - i_ablate) / i_full >= med["min_interaction_share_removed"]


def _final_mlp_outputs(model: torch.nn.Module, layer: int, rows: list) -> torch.Tensor:
    """`[n_events, d_model]`: `model`'s final-MLP output at each event's scored position (its own clean run)."""
    outs = []
    handle = model.model.layers[layer].mlp.register_forward_hook(
        lambda _m, _a, out: outs.append(out[0, -1].detach())  # [d_model] at the scored position
    )
    try:
        with torch.no_grad():
            for _, event in rows:
                model(torch.tensor([event.input_ids]))
    finally:
        handle.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("family", MEDIATED_FAMILIES)
def test_mediator_directions_dominate_the_final_mlp_output(built, family: str) -> None:
    """At divergent steps IT's final MLP writes the recorded mediator directions plus the word-group background
    that PT's final MLP writes too; outside the background axes it is mostly the mediator directions."""
    pair, rows, _, expected = _run(built(f"{family}_mediated"))
    med, bg = expected["mediators"], expected["background"]
    basis = torch.tensor(med["directions"])  # [n_mediators, d_model], orthonormal by construction
    background = torch.tensor(bg["directions"])  # [n_groups, d_model]: one axis each
    assert torch.allclose(basis @ basis.T, torch.eye(len(basis)), atol=1e-6)
    assert torch.allclose(background @ background.T, torch.eye(len(background)), atol=1e-6)
    assert (basis @ background.T).abs().max() == 0  # the background never writes a mediator direction
    mlp_out = _final_mlp_outputs(pair.it, med["layer"], rows)  # [n_events, d_model]
    foreground = mlp_out - (mlp_out @ background.T) @ background
    explained = ((foreground @ basis.T) ** 2).sum() / (foreground**2).sum()
    assert explained > 0.99, float(explained)
    active = (mlp_out @ basis.T).argmax(dim=-1)  # one mediator per event: the class of its current word
    assert len(set(active.tolist())) == len(basis)
    # every event's word fires its group's background neuron, in PT as in IT (one group axis each)
    pt_out = _final_mlp_outputs(pair.pt, bg["layer"], rows)
    for out in (mlp_out, pt_out):
        on_groups = out @ background.T  # [n_events, n_groups]
        assert (on_groups.max(dim=-1).values > 2.0).all() and ((on_groups > 0.5).sum(dim=-1) == 1).all()
    assert len({int(g) for g in (pt_out @ background.T).argmax(dim=-1)}) >= 8  # many groups at scored words
