"""Other event definitions (method 1.3) on `paper_sized`: first non-format and first assistant-marker difference."""

from __future__ import annotations

import functools

import pytest
import torch

from crosspatch.engine.divergence import DIVERGED, find_divergences, real_token_mask
from crosspatch.engine.event_kinds import is_format_only, is_marker, no_event_reason
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.results import events_table

NAME = "llama_paper_sized"


@functools.cache
def _run():
    root = organism_path(NAME)
    pair = load_pair(root / "pt", root / "it")
    prompts = load_prompts(root / "prompts.jsonl", limit=8)
    first = find_divergences(pair, prompts, max_new_tokens=16)
    nonformat = find_divergences(pair, prompts, max_new_tokens=16, event="first_nonformat_diff")
    return pair, first, nonformat


def _argmax(pair, ids: list[int]) -> tuple[int, int]:
    """PT's and IT's masked greedy next token after `ids` (a plain forward of each model)."""
    out = []
    for model, tok in ((pair.pt, pair.tokenizer), (pair.it, pair.it_tokenizer)):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logits[~real_token_mask(model, tok)[: logits.shape[-1]]] = float("-inf")
        out.append(int(logits.argmax()))
    return out[0], out[1]


def test_token_classes():
    assert (
        is_format_only(",") and is_format_only(" \n") and is_format_only("**") and is_format_only("", False)
    )
    assert not is_format_only(" Sure") and not is_format_only("9") and is_format_only("Sure", special=True)
    assert (
        is_marker("<|im_start|>")
        and is_marker("assistant")
        and is_marker("[/INST]")
        and not is_marker("Sure")
    )


@torch.no_grad()
def test_first_nonformat_diff_skips_punctuation_disagreements():
    pair, first, nonformat = _run()
    assert all(e.event == "first_diff" for e in first) and all(
        e.event == "first_nonformat_diff" for e in nonformat
    )
    moved = 0
    for a, b in zip(first, nonformat, strict=True):
        assert a.diverged and a.prompt_id == b.prompt_id
        if not is_format_only(a.t_pt_text) and not is_format_only(a.t_it_text):
            assert (b.position, b.t_pt, b.t_it, b.prefix_ids) == (a.position, a.t_pt, a.t_it, a.prefix_ids)
            continue
        moved += 1
        if not b.diverged:
            assert b.reason == no_event_reason("first_nonformat_diff") and b.position is None
            continue
        # later than the first divergence, on PT's own rollout, and a real content disagreement there
        assert b.reason == DIVERGED and b.position > a.position and b.prefix_ids[: a.position] == a.prefix_ids
        assert b.prefix_ids[a.position] == a.t_pt  # PT's history continues with its own token
        assert _argmax(pair, b.prompt_ids + b.prefix_ids) == (b.t_pt, b.t_it)
        assert not is_format_only(b.t_pt_text) and not is_format_only(b.t_it_text)
    assert moved >= 1  # prompt 7 diverges at position 0 with PT's ','
    table = events_table(nonformat, "llama", NAME)
    assert set(table["event"].to_pylist()) == {"first_nonformat_diff"}


def test_assistant_marker_kind_finds_none_on_an_organism_without_markers():
    pair, _, _ = _run()
    root = organism_path(NAME)
    events = find_divergences(
        pair,
        load_prompts(root / "prompts.jsonl", limit=3),
        max_new_tokens=8,
        event="first_assistant_marker_diff",
    )
    assert all(not e.diverged and e.reason == "no_assistant_marker_diff_within_budget" for e in events)
    with pytest.raises(ValueError, match="unknown event definition"):
        find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=1), event="first_token")
