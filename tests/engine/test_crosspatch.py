"""The 2x2 table: formulas, the IT == PT identity, sweeps, streaming, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch, iter_crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.errors import (
    CrosspatchError,
    PromptFileError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from crosspatch.engine.organisms.tiny import forced_events
from crosspatch.engine.pairs import ModelPair, load_pair
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.engine.results import CELLS_SCHEMA


def _forced_events(pair, n=8, seed=0):
    """Events on fixed token pairs, so IT == PT pairs can be scored too."""
    return forced_events(pair, random_prompts(n, seed=seed))


def test_table_schema_and_effect_formulas():
    pair = tiny_pair("qwen3", it_scale=0.05)
    table = crosspatch(pair, _forced_events(pair), boundary=[1, 3], readouts=("it", "pt"))
    assert table.schema == CELLS_SCHEMA
    assert table.num_rows == 8 * 2 * 2
    d = table.to_pydict()
    for i in range(table.num_rows):
        pt_late = d["y_ptup_itlate"][i] - d["y_ptup_ptlate"][i]
        it_late = d["y_itup_itlate"][i] - d["y_itup_ptlate"][i]
        assert d["pt_late_effect"][i] == pytest.approx(pt_late, abs=1e-12)
        assert d["it_late_effect"][i] == pytest.approx(it_late, abs=1e-12)
        assert d["interaction"][i] == pytest.approx(
            (d["y_itup_itlate"][i] - d["y_itup_ptlate"][i]) - (d["y_ptup_itlate"][i] - d["y_ptup_ptlate"][i]),
            abs=1e-12,
        )


def test_identical_pair_gives_equal_cells_and_zero_interaction():
    pair = tiny_pair("gemma3", it_scale=0.0)
    table = crosspatch(pair, _forced_events(pair), boundary="sweep", readouts=("it", "pt", "own"))
    y = np.column_stack(
        [table[c].to_numpy() for c in ("y_ptup_ptlate", "y_ptup_itlate", "y_itup_ptlate", "y_itup_itlate")]
    )
    assert np.all(y == y[:, :1])
    assert np.all(table["interaction"].to_numpy() == 0.0)
    assert find_divergences(pair, random_prompts(4), max_new_tokens=4) and not any(
        e.diverged for e in find_divergences(pair, random_prompts(4), max_new_tokens=4)
    )


def test_sweep_equals_separate_runs_per_boundary():
    pair = tiny_pair("olmo2", it_scale=0.05)
    events = _forced_events(pair, n=6)
    sweep = crosspatch(pair, events, boundary="sweep")
    assert sorted(set(sweep["boundary"].to_pylist())) == list(range(1, pair.n_layers))
    for b in range(1, pair.n_layers):
        single = crosspatch(pair, events, boundary=b)
        part = sweep.filter(pc.equal(sweep["boundary"], b))
        np.testing.assert_allclose(
            part["interaction"].to_numpy(), single["interaction"].to_numpy(), atol=1e-6
        )


def test_streams_one_table_per_batch_and_skips_non_events():
    pair = tiny_pair("llama", it_scale=0.05)
    events = _forced_events(pair, n=10)
    events[3].diverged = False
    parts = list(iter_crosspatch(pair, events, batch_size=4))
    assert [p.num_rows for p in parts] == [4, 4, 1]
    assert "p003" not in pc.unique(crosspatch(pair, events)["prompt_id"]).to_pylist()


def test_boundary_validation():
    pair = tiny_pair("llama")  # 5 layers
    assert pair.default_boundary == 3
    assert pair.resolve_boundaries(0.4) == [2]
    assert pair.resolve_boundaries("sweep") == [1, 2, 3, 4]
    for bad in (6, -1, 1.5, "late", []):
        with pytest.raises(CrosspatchError):
            pair.resolve_boundaries(bad)


def test_bad_readout():
    pair = tiny_pair("llama")
    with pytest.raises(ValueError, match="readout"):
        crosspatch(pair, _forced_events(pair, 2), readouts=("mine",))


def test_missing_model_path(tmp_path):
    with pytest.raises(CrosspatchError, match=r"config\.json"):
        load_pair(tmp_path / "nope", tmp_path / "nope2")


def test_unknown_architecture():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gpt_neo",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global"], 2]],
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: gemma3"):
        ModelPair.from_models(model, model, None)


def test_mismatched_tokenizers_name_the_prompt():

    pair = tiny_pair("llama")
    prompts = [*random_prompts(3), PromptRecord(id="bad-one", text="w1 w7w w2")]
    pair.it_tokenizer = _ShiftTokenizer(pair.tokenizer)
    with pytest.raises(TokenizerMismatchError, match="bad-one"):
        pair.check_same_ids((p.id, p.text) for p in prompts)


class _ShiftTokenizer:
    """A tokenizer that disagrees with its base only on texts containing 'w7w'."""

    def __init__(self, base):
        self.base = base

    def encode(self, text, add_special_tokens=True):
        ids = self.base.encode(text, add_special_tokens=add_special_tokens)
        return [*ids, 99] if "w7w" in text else ids


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n{not json\n")
    with pytest.raises(PromptFileError, match="line 2"):
        load_prompts(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(PromptFileError, match="line 1: needs a non-empty 'prompt'"):
        load_prompts(missing)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "absent.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"}) + "\n"
    )
    with pytest.raises(PromptFileError, match="duplicate id 'a'"):
        load_prompts(dup)


def test_prompt_formats_b_then_a_then_prompt(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [
        {"id": 1, "formats": {"A": "raw a", "B": "Question: b"}, "category": "GOV-CONV"},
        {"id": 2, "formats": {"A": "raw a"}},
        {"id": 3, "prompt": "plain", "expected_answer": 42, "answer_aliases": ["42.0"]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    recs = load_prompts(f)
    assert [r.text for r in recs] == ["Question: b", "raw a", "plain"]
    assert (
        recs[0].category == "GOV-CONV"
        and recs[2].expected_answer == "42"
        and recs[2].answer_aliases == ("42.0",)
    )
