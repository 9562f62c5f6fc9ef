"""Dictionaries never see evaluation prompts: the for_pair path trains only outside the mediation test
split and records it; mediation (library and CLI) refuses test events among the training prompts and a
failed gate unless overridden, with the override recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.mediation import BranchView, MediationConfig, mediate, split_events
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.saes.cache import ActivationCache
from crosspatch.saes.for_pair import train_for_pair
from crosspatch.saes.load import load_dictionary

NAME = "llama_mediated"
SMALL = dict(architecture="topk", width=16, k=1, training_tokens=2048, continuation_tokens=16, batch_size=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = organism_path(NAME)
    pair = load_pair(root / "pt", root / "it", family="llama", pair_id=NAME)
    prompts = load_prompts(root / "prompts.jsonl")
    events = find_divergences(pair, prompts, max_new_tokens=16)
    out = tmp_path_factory.mktemp("for-pair")
    d = train_for_pair(pair, prompts, out, max_new_tokens=16, **SMALL)  # the method's default gate
    return pair, prompts, events, d, out


def test_for_pair_trains_only_outside_the_mediation_test_split(setup) -> None:
    _, prompts, events, d, out = setup
    fit, test = split_events(events, 0.27, 0)  # what mediation with the default fit fraction / seed tests
    test_ids = {e.prompt_id for e in test}
    assert len(test_ids) == sum(e.diverged for e in events) - len(fit) > 0
    assert d.training_prompt_ids == {p.id for p in prompts} - test_ids
    assert d.training_prompt_ids.isdisjoint(test_ids) and {e.prompt_id for e in fit} <= d.training_prompt_ids
    split = d.training_split
    assert split["kind"] == "mediation_fit" and split["excluded_test_prompt_ids"] == sorted(test_ids)
    assert split["n_fit"] == len(fit) and split["n_prompts"] == len(prompts)
    cache = ActivationCache(out / "cache")
    assert cache.manifest["n_sequences"] == len(d.training_prompt_ids)  # one cached sequence per kept prompt
    assert set(cache.manifest["source"]["prompt_ids"]) == d.training_prompt_ids
    # the default gate fails on the tiny organism's held-out set, by name
    failed = [c["name"] for c in d.meta["gate"]["checks"] if c["status"] == "failed"]
    assert d.gate_status == "failed" and "heldout_tokens" in failed


def test_mediation_refuses_failed_gate_and_training_prompts(setup, tmp_path: Path) -> None:
    pair, prompts, events, d, _ = setup
    cfg = MediationConfig(top_k=4, ks=(4,), n_resamples=100)
    with pytest.raises(CrosspatchError, match="quality-gate status 'failed'"):
        mediate(pair, events, [BranchView(d, "it")], cfg)
    cfg.allow_failed_gate = True
    res = mediate(pair, events, [BranchView(d, "it")], cfg)
    (check,) = res.dictionary_checks
    assert check["overridden"] and check["gate_status"] == "failed" and check["test_overlap"] == 0
    assert check["training_prompts"] == len(d.training_prompt_ids)
    assert set(res.test_ids).isdisjoint(d.training_prompt_ids)
    # a dictionary trained on every prompt (training_prompts="all") may not be tested on them
    leaky = train_for_pair(pair, prompts, tmp_path / "all", training_prompts="all", **SMALL)
    assert leaky.training_prompt_ids == {p.id for p in prompts}
    with pytest.raises(CrosspatchError, match=r"\d+ of \d+ test events come from prompts that trained"):
        mediate(pair, events, [BranchView(leaky, "it")], cfg)


def test_mediate_cli_refuses_then_overrides_and_records(setup, tmp_path: Path, capsys) -> None:
    _, _, _, d, _ = setup
    args = ["mediate", "--pair", NAME, "--dict", str(d.path), "--out", str(tmp_path / "m"), "--top-k", "4",
            "--ks", "4", "--max-new-tokens", "16"]  # fmt: skip
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and "heldout_tokens" in err and "--allow-failed-gate" in err
    code, out, err = run_cli(capsys, *args, "--allow-failed-gate")
    assert code == 0, err
    assert "used by override" in out and "heldout_tokens" in out
    meta = json.loads((Path(d.path) / "crosspatch_meta.json").read_text())
    rec = meta["gate"]["overrides"][-1]
    assert rec["reason"] == "crosspatch mediate --allow-failed-gate" and "heldout_tokens" in rec["failed"]
    assert load_dictionary(d.path).gate_status == "failed"  # the override is recorded, the status kept
