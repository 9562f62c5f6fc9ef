"""Near-tie flags at the divergence step (issue: precision on real checkpoints): fp32 top-2 gaps of both
models, the bf16-step threshold, a constructed tie, and the near-tie-excluding subset in summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import bf16_step, find_divergences, real_token_mask
from crosspatch.engine.report import format_event_counts
from crosspatch.engine.results import events_from_table, events_table
from crosspatch.engine.stats import summarize


def _hf_gap(model, tokenizer, input_ids: list[int], chosen: int) -> tuple[float, float]:
    """By hand from the model's own HF forward: (logit(chosen) - max other masked logit, max |.| of the two)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0, -1].double()  # [vocab]
    mask = real_token_mask(model, tokenizer)
    logits = torch.where(mask, logits, torch.tensor(float("-inf"), dtype=torch.float64))
    top = logits[chosen].item()
    logits[chosen] = float("-inf")
    other = logits.max().item()
    return top - other, max(abs(top), abs(other))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gaps_equal_the_models_own_logits(family: str) -> None:
    """With fp32 weights, gap_pt / gap_it equal the top-1 minus runner-up of each model's own HF logits
    (gemma3: after its softcap), and near_tie is exactly the bf16-step rule on them."""
    pair = tiny_pair(family)
    events = [e for e in find_divergences(pair, random_prompts(16, seed=1), max_new_tokens=8) if e.diverged]
    assert len(events) >= 8
    for e in events:
        g_pt, m_pt = _hf_gap(pair.pt, pair.tokenizer, e.input_ids, e.t_pt)
        g_it, m_it = _hf_gap(pair.it, pair.it_tokenizer, e.input_ids, e.t_it)
        assert e.gap_pt == pytest.approx(g_pt, abs=1e-5) and e.gap_it == pytest.approx(g_it, abs=1e-5)
        assert e.gap_pt > 0 and e.gap_it > 0  # fp32 weights: the fp32 readout picks the same tokens
        step = lambda m: 2.0 ** (math.floor(math.log2(m)) - 7)  # noqa: E731
        assert e.near_tie == (g_pt < step(m_pt) or g_it < step(m_it))


def test_bf16_step_values() -> None:
    """bf16's spacing: 1/8 at 20 and 16, 1/16 just below 16, 2^-7 at 1."""
    got = bf16_step(torch.tensor([20.0, 16.0, 15.9, -31.0, 1.0])).tolist()
    assert got == [0.125, 0.125, 0.0625, 0.125, 2.0**-7]


def test_a_constructed_tie_is_flagged_and_left_out_of_the_subset() -> None:
    """Copy IT's unembedding row of t_it into a later token's row: that event's IT gap is exactly 0 and it
    is a near tie; decoding is unchanged (argmax keeps the lower id); summaries' 'no_near_tie' leaves it out."""
    pair = tiny_pair("llama")
    prompts = random_prompts(24, seed=3)
    before = find_divergences(pair, prompts, max_new_tokens=8)
    target = next(e for e in before if e.diverged and not e.near_tie and e.t_it < 400)
    twin = target.t_it + 101  # a real token after t_it, unused by this event's prompt
    assert twin not in target.input_ids
    with torch.no_grad():
        w = pair.it_adapter.unembed.weight
        w[twin] = w[target.t_it]
    after = find_divergences(pair, prompts, max_new_tokens=8)
    tied = next(e for e in after if e.prompt_id == target.prompt_id)
    assert (tied.position, tied.t_pt, tied.t_it) == (target.position, target.t_pt, target.t_it)
    assert tied.gap_it == 0.0 and tied.gap_pt == target.gap_pt and tied.near_tie is True

    scored = [e for e in after if e.diverged]
    n_ties = sum(e.near_tie for e in scored)
    assert 1 <= n_ties < len(scored)
    assert format_event_counts(after).startswith(
        f"events: {len(scored)}/24 prompts scored ({n_ties} near ties)"
    )

    # round trip through the events table
    back = events_from_table(events_table(after, pair.family, pair.pair_id))
    assert [(e.gap_pt, e.gap_it, e.near_tie) for e in back] == [
        (e.gap_pt, e.gap_it, e.near_tie) for e in after
    ]

    cells = crosspatch(pair, scored, boundary=3)
    assert cells.column("near_tie").to_pylist() == [
        e.near_tie for e in sorted(scored, key=lambda e: e.prompt_id)
    ]
    rows = {
        r["subset"]: r
        for r in summarize(cells, n_permutations=200).to_pylist()
        if r["level"] == "pair" and r["statistic"] == "interaction"
    }
    keep = ~np.array(cells.column("near_tie").to_pylist(), dtype=bool)
    inter = cells.column("interaction").to_numpy()
    assert rows["all"]["n"] == len(scored)
    assert rows["no_near_tie"]["n"] == len(scored) - n_ties
    assert rows["no_near_tie"]["estimate"] == pytest.approx(inter[keep].mean(), abs=1e-12)


def test_an_absolute_threshold_and_bad_thresholds() -> None:
    """With `near_tie_threshold` t an event is a near tie iff min(gap_pt, gap_it) < t; a bad t is a ValueError."""
    pair = tiny_pair("gemma3")
    prompts = random_prompts(16, seed=1)
    events = [e for e in find_divergences(pair, prompts, max_new_tokens=8) if e.diverged]
    t = float(np.median([min(e.gap_pt, e.gap_it) for e in events]))
    flagged = [e for e in find_divergences(pair, prompts, 8, near_tie_threshold=t) if e.diverged]
    assert [e.near_tie for e in flagged] == [min(e.gap_pt, e.gap_it) < t for e in events]
    assert 0 < sum(e.near_tie for e in flagged) < len(flagged)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="near_tie_threshold"):
            find_divergences(pair, prompts[:2], 4, near_tie_threshold=bad)
