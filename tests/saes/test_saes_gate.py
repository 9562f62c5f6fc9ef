"""The full quality gate (method section 5.1): named checks, the held-out minimum, pending causal checks,
and mediation refusing a failed gate unless overridden (override recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosspatch.saes.cache import is_heldout
from crosspatch.saes.errors import GateFailedError
from crosspatch.saes.load import load_dictionary
from crosspatch.saes.quality import (
    GateConfig,
    apply_gate,
    evaluate_dictionary,
    record_causal_checks,
    require_gate,
)
from crosspatch.saes.train import make_config, train_dictionary


def _checks(d) -> dict[str, dict]:
    return {c["name"]: c for c in d.meta["gate"]["checks"]}


def _alive_on(d, x: torch.Tensor) -> float:
    """Independent count: fraction of latents firing on rows `x` (`[n, d]`)."""
    with torch.no_grad():
        return float((d.encode(x) > 0).any(0).float().mean())


@pytest.fixture(scope="module")
def topk16(tmp_path_factory: pytest.TempPathFactory, planted_source):
    """A width-16, k=1 TopK SAE on 12 planted directions: good FVE, but nearly every latent is alive."""
    src, _ = planted_source
    out = tmp_path_factory.mktemp("topk16")
    cfg = make_config("topk", layer=4, width=16, k=1, training_tokens=12_800, batch_size=128, lr=3e-3)
    return train_dictionary(cfg, src, out, evaluate=False)


def test_alive_fraction_above_band_fails_by_name(topk16, planted_source) -> None:
    src, _ = planted_source
    n_held = int(is_heldout(torch.arange(12000), 0.1).sum())  # rows of the prompt-level held-out split
    assert 1000 <= n_held < 10_000
    m = evaluate_dictionary(topk16, src, gate=GateConfig(min_heldout_tokens=1000))
    c = _checks(topk16)
    names = [
        "heldout_tokens",
        "fve_it",
        "l0_target",
        "alive_fraction",
        "topk_causal_drop",
        "matched_random_drop",
    ]
    assert list(c) == names
    held = src.load(["it.L4.mlp_out"], "heldout")
    assert m["n_tokens"] == n_held and c["heldout_tokens"]["status"] == "passed"
    assert c["alive_fraction"]["value"] == pytest.approx(_alive_on(topk16, held), abs=1e-12)
    assert c["alive_fraction"]["value"] > 0.20 and c["alive_fraction"]["status"] == "failed"
    assert c["alive_fraction"]["threshold"] == "in [0.01, 0.2]"
    assert c["fve_it"]["value"] == m["fve_it"] and c["fve_it"]["threshold"] == ">= 0.75"
    assert c["l0_target"]["value"] == pytest.approx(1.0, abs=0.02) and c["l0_target"]["status"] == "passed"
    assert c["topk_causal_drop"]["status"] == c["matched_random_drop"]["status"] == "pending"
    assert topk16.gate_status == "failed" and topk16.meta["gate"]["pending"] == [
        "topk_causal_drop",
        "matched_random_drop",
    ]
    with pytest.raises(GateFailedError, match=r"alive_fraction 0\.\d+ \(in \[0\.01, 0\.2\]\): failed"):
        require_gate(topk16)


def test_too_small_heldout_set_fails_with_the_minimum_tokens_reason(topk16, planted_source) -> None:
    src, _ = planted_source
    n_held = int(is_heldout(torch.arange(12000), 0.1).sum())
    evaluate_dictionary(topk16, src, gate=GateConfig(min_fve=0.0, alive_range=None))  # minimum: 10,000
    c = _checks(topk16)["heldout_tokens"]
    assert c["value"] == n_held and c["status"] == "failed" and c["threshold"] == ">= 10000"
    assert c["detail"] == f"held-out set has {n_held} tokens, fewer than the minimum 10000"
    assert topk16.gate_status == "failed"
    assert [x["name"] for x in topk16.meta["gate"]["checks"] if x["status"] == "failed"] == ["heldout_tokens"]
    with pytest.raises(GateFailedError, match="heldout_tokens"):
        require_gate(topk16)
    # an empty held-out split is a failed gate with the same reason, not a crash
    gate = apply_gate(topk16, {"n_tokens": 0}, GateConfig())
    c = {x["name"]: x for x in gate["checks"]}
    assert gate["status"] == "failed" and c["heldout_tokens"]["value"] == 0
    assert c["fve_it"]["status"] == c["alive_fraction"]["status"] == "not_measured"


def test_dead_latents_fail_refused_then_overridden_and_recorded(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    cfg = make_config("topk", layer=4, width=128, k=1, training_tokens=1280, batch_size=128, lr=3e-3)
    d = train_dictionary(cfg, src, tmp_path, evaluate=False)
    with torch.no_grad():  # kill all latents but one: alive fraction 1/128 < 0.01
        d.sae.b_enc[1:] = -1e6
        d.sae.b_enc[0] = 10.0
    evaluate_dictionary(d, src, gate=GateConfig(min_heldout_tokens=1000))
    c = _checks(d)["alive_fraction"]
    assert c["value"] == 1 / 128 and c["status"] == "failed"
    with pytest.raises(GateFailedError, match=r"gate status 'failed': .*alive_fraction 0.0078"):
        require_gate(d)
    rec = require_gate(d, override=True, reason="dead-latent ablation study")
    assert rec["overridden"] and "alive_fraction" in rec["override"]["failed"]
    on_disk = json.loads((tmp_path / "crosspatch_meta.json").read_text())["gate"]
    assert on_disk["overrides"][0]["reason"] == "dead-latent ablation study"
    assert "alive_fraction" in on_disk["overrides"][0]["failed"]
    evaluate_dictionary(d, src, gate=GateConfig(min_heldout_tokens=1000))  # re-evaluation keeps history
    assert load_dictionary(tmp_path).meta["gate"]["overrides"][0]["reason"] == "dead-latent ablation study"


def test_architecture_without_k_says_not_applicable(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    cfg = make_config("standard", layer=4, width=16, training_tokens=256, batch_size=128)
    d = train_dictionary(cfg, src, tmp_path, gate=GateConfig(min_heldout_tokens=1000))
    c = _checks(d)["l0_target"]
    assert c["status"] == "not_applicable" and c["passed"] is None
    assert c["detail"] == "architecture standard has no (Batch)TopK target k"


def test_causal_checks_attach_by_name(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    cfg = make_config("topk", layer=4, width=16, k=1, training_tokens=1280, batch_size=128, lr=3e-3)
    d = train_dictionary(
        cfg, src, tmp_path, gate=GateConfig(min_fve=0.0, min_heldout_tokens=1000, alive_range=None)
    )
    assert d.gate_status == "passed" and d.meta["gate"]["pending"] == [
        "topk_causal_drop",
        "matched_random_drop",
    ]
    measured = [
        {"name": "topk_causal_drop", "value": 0.6, "detail": "mean top-4 drop"},
        {"name": "matched_random_drop", "value": 0.01, "detail": "5 seeds"},
    ]
    record_causal_checks(d, measured, source="test, k=4")
    c = _checks(d)
    assert c["topk_causal_drop"]["status"] == "passed" and c["topk_causal_drop"]["value"] == 0.6
    assert d.gate_status == "passed" and d.meta["gate"]["pending"] == []
    # the control removes too much: the gate fails
    record_causal_checks(d, [{"name": "matched_random_drop", "value": 0.2, "detail": ""}])
    c = _checks(load_dictionary(tmp_path))
    assert (
        c["matched_random_drop"]["status"] == "failed" and load_dictionary(tmp_path).gate_status == "failed"
    )
    # a control mediation could not draw (pool too small) fails with mediation's reason, never passes
    unavailable = {"name": "matched_random_drop", "value": None, "detail": "unavailable: pool too small"}
    record_causal_checks(d, [unavailable], save=False)
    c = _checks(d)
    assert (
        c["matched_random_drop"]["status"] == "failed"
        and "pool too small" in c["matched_random_drop"]["detail"]
    )
