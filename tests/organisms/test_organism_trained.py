"""Shipped trained organisms and tiny random pairs: reload, size, real divergences on their prompts."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.organisms import TRAINED, organism_path
from crosspatch.engine.organisms.tiny import FAMILIES, tiny_models
from crosspatch.engine.pairs import ModelPair, load_pair
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.engine.stats import bootstrap_ci


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_reload_with_plain_hf_and_are_small(name: str) -> None:
    root = organism_path(name)
    expected = json.loads((root / "expected.json").read_text())
    assert expected["name"] == name and expected["kind"] == "trained"
    tok = AutoTokenizer.from_pretrained(root / "pt")
    for role in ("pt", "it"):
        assert (root / role / "model.safetensors").stat().st_size < 5_000_000
        model = AutoModelForCausalLM.from_pretrained(root / role)
        assert model.config.model_type == expected["family"]
        assert model.config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(root / "it").get_vocab() == tok.get_vocab()
    prompts = load_prompts(root / "prompts.jsonl")
    heldout = load_prompts(root / "prompts_heldout.jsonl")
    assert not {p.id for p in prompts} & {p.id for p in heldout}
    assert len({p.category for p in prompts}) > 1


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_diverge_at_varied_positions_with_a_measurable_2x2(name: str) -> None:
    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it")
    events = find_divergences(pair, load_prompts(root / "prompts.jsonl"))
    diverged = [e for e in events if e.diverged]
    assert len(diverged) >= 0.75 * len(events)
    positions = Counter(e.position for e in diverged)
    assert len(positions) > 1, positions  # not every event at position 0
    table = crosspatch(pair, diverged).to_pydict()
    mean, lo, hi = bootstrap_ci(table["interaction"])
    assert lo < mean < hi  # per-prompt values vary: a non-degenerate interval


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_share_the_tokenizer_and_diverges(family: str) -> None:
    pt, it, tok = tiny_models(family, seed=0)
    assert pt.config.vocab_size == len(tok)
    assert not torch.equal(pt.get_output_embeddings().weight, it.get_output_embeddings().weight)
    pair = ModelPair.from_models(pt, it, tok)
    prompts = [
        PromptRecord(id=f"p{i}", text=t) for i, t in enumerate(("the cat sees", "Q : what is 3 + 4 ? A :"))
    ]
    events = find_divergences(pair, prompts, max_new_tokens=32)
    assert any(e.diverged for e in events), [e.reason for e in events]


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path) -> None:
    """Two short runs of scripts/train_organisms.py from one seed write identical weights."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_organisms.py"
    spec = importlib.util.spec_from_file_location("train_organisms", script)
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train  # dataclasses look their module up there
    spec.loader.exec_module(train)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        for run in ("a", "b"):
            args = ["--family", "llama", "--pt-steps", "6", "--it-steps", "3", "--out", str(tmp_path / run)]
            assert train.main(args) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for role in ("pt", "it"):
        a, b = (tmp_path / run / "trained_llama" / role / "model.safetensors" for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
