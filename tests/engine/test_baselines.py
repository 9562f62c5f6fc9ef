"""Selection baselines on `paper_sized`: first divergence > random local disagreement > pre-divergence ~ 0.

The organism puts every first divergence on a strong class (upstream-dependent late push); later
disagreements in either rollout meet weak classes too (a smaller push), and before the first divergence
no planted late neuron fires at all (the current word is unclassed), so the late stacks agree exactly.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import organism_events  # tests/helpers.py

from crosspatch.engine.baselines import (
    BASELINE_CELLS_SCHEMA,
    BASELINE_SUMMARY_SCHEMA,
    CONDITIONS,
    baseline_cells,
    clustered_interaction,
    native_history_cells,
    native_history_events,
    pre_divergence_events,
    random_disagreements,
    summarize_baselines,
)
from crosspatch.engine.organisms import load_expected

NAME = "llama_paper_sized"


@functools.cache
def _run():
    _root, pair, events = organism_events(NAME, limit=24, diverged_only=False)
    cells = baseline_cells(pair, events, max_new_tokens=32, batch_size=8)
    return pair, events, cells


def test_planted_ordering_and_shares() -> None:
    _, events, cells = _run()
    assert cells.schema == BASELINE_CELLS_SCHEMA
    summary, table = summarize_baselines(cells)
    assert table.schema == BASELINE_SUMMARY_SCHEMA
    by = {s.condition: s for s in summary}
    first, balanced, pre = by["first_divergence"], by["random_balanced"], by["pre_divergence"]
    assert first.n == 24 and first.share == 1.0
    assert by["random_pt_rollout"].n >= 15 and by["random_it_rollout"].n >= 15  # 8 tries of 32 tokens
    assert pre.n == sum(e.position >= 3 for e in events) == 16
    assert first.interaction > balanced.interaction > pre.interaction
    assert first.ci_low > balanced.ci_high  # separated, not just ordered
    assert balanced.ci_low > 0 and 0.2 < balanced.share < 0.9 and balanced.share_ci_high < 1.0
    assert abs(pre.interaction) < 1e-4 and pre.ci_low <= 0 <= pre.ci_high and abs(pre.share) < 1e-4


def test_random_disagreements_follow_the_planted_classes() -> None:
    """Each random event's interaction matches its current word's class nominal (strong or weak)."""
    pair, _, cells = _run()
    expected = load_expected(NAME)
    tok = pair.tokenizer
    classes = expected["classes"]
    answer_class = {c["answer_word"]: j for j, c in classes.items()}
    d = cells.filter(
        np.isin(cells["condition"].to_numpy(zero_copy_only=False), ["random_pt_rollout", "random_it_rollout"])
    )
    strong = weak = 0
    for t_it, value in zip(d["t_it"].to_pylist(), d["interaction"].to_pylist(), strict=True):
        j = answer_class[tok.convert_ids_to_tokens(t_it)]
        nominal = classes[j]["cells"]["interaction"]
        assert abs(value - nominal) <= 0.1 * abs(nominal) + 0.5, (j, value, nominal)
        strong += classes[j]["strong"]
        weak += not classes[j]["strong"]
    assert strong > 0 and weak > 0  # both kinds of disagreement are sampled


def test_sampling_is_seeded_and_never_the_first_divergence() -> None:
    pair, events, _ = _run()
    a = random_disagreements(pair, events[:6], "pt", max_new_tokens=16, seed=3)
    b = random_disagreements(pair, events[:6], "pt", max_new_tokens=16, seed=3, batch_size=2)
    assert [(e.prompt_id, e.position, e.t_pt, e.t_it) for e in a] == [
        (e.prompt_id, e.position, e.t_pt, e.t_it) for e in b
    ]
    first = {e.prompt_id: e.position for e in events}
    for e in a:
        assert e.position != first[e.prompt_id] and e.t_pt != e.t_it
    pre = pre_divergence_events(pair, events, seed=1)
    for e in pre:
        s = first[e.prompt_id]
        assert 0 <= e.position <= s - 2 and e.input_ids == e.prompt_ids + e.prefix_ids


def test_bad_inputs() -> None:
    pair, events, cells = _run()
    with pytest.raises(ValueError, match="source"):
        random_disagreements(pair, events[:2], "both")
    with pytest.raises(ValueError, match="one first-divergence event per prompt"):
        baseline_cells(pair, [events[0], events[0]])
    assert set(cells["condition"].to_pylist()) == set(CONDITIONS)


@pytest.mark.parametrize("source", ["it", "pt"])
def test_native_history_disagreements_carry_the_planted_interaction(source: str) -> None:
    """Disagreements after h native tokens sit on classed words: each matches its class's nominal."""
    pair, events, _ = _run()
    classes = load_expected(NAME)["classes"]
    answer_class = {c["answer_word"]: j for j, c in classes.items()}
    native = native_history_events(pair, events, source, horizons=(4, 8, 16), max_new_tokens=16, batch_size=8)
    cells = native_history_cells(pair, native, source, batch_size=8)
    assert cells.schema == BASELINE_CELLS_SCHEMA and cells.num_rows > 0
    assert set(cells["condition"].to_pylist()) == {f"native_{source}_history"}
    assert set(cells["position"].to_pylist()) <= {4, 8, 16}
    for t_it, value in zip(cells["t_it"].to_pylist(), cells["interaction"].to_pylist(), strict=True):
        nominal = classes[answer_class[pair.tokenizer.convert_ids_to_tokens(t_it)]]["cells"]["interaction"]
        assert abs(value - nominal) <= 0.1 * abs(nominal) + 0.5
    mean, lo, _, n_events, n_prompts = clustered_interaction(cells)
    assert mean > lo > 0 and n_prompts <= n_events <= 3 * n_prompts
    with pytest.raises(ValueError, match="horizons"):
        native_history_events(pair, events, source, horizons=(0, 4))
