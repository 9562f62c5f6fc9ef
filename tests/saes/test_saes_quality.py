"""Quality gate and the issue's acceptance tests on the constructed `mediated` organism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fast_config

from crosspatch.saes.errors import GateFailedError
from crosspatch.saes.load import load_dictionary
from crosspatch.saes.quality import GateConfig, evaluate_dictionary, require_gate, splice_metrics
from crosspatch.saes.train import make_config, train_dictionary


def _unit(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(w, dim=-1)


@pytest.mark.slow
def test_mediated_sae_passes_gate_and_finds_planted_directions(tmp_path: Path, mediated) -> None:
    """Acceptance: SAE on IT final-MLP output of `mediated` passes the gate, one latent per planted direction.

    k=0.5 is the organism's true L0 (at most one mediator fires, on about half the tokens); with k=1
    BatchTopK may split a mediator into two half-latents, a valid but less readable dictionary.
    """
    _pt, it, expected, cache = mediated
    med = expected["mediators"]
    layer, dirs = med["layer"], torch.tensor(med["directions"])  # [4, d_model]
    cfg = fast_config("batchtopk", layer=layer, width=16, k=0.5, training_tokens=100_000)
    # explicit, lowered gate settings for a 10k-token organism cache with 4 planted features in 16 latents
    gate = GateConfig(min_heldout_tokens=500, alive_range=(0.01, 0.5))
    d = train_dictionary(cfg, cache, tmp_path, models={"it": it}, gate=gate)
    cos = (dirs @ _unit(d.W_dec["it"]).T).max(-1).values
    assert cos.min() >= 0.9, cos
    m = d.meta["metrics"]
    assert d.gate_status == "passed" and m["fve_it"] >= 0.75
    assert m["kl_it"] < 0.05 and abs(m["delta_ce_it"]) < 0.1  # splicing the reconstruction barely moves IT
    assert m["n_splice_tokens_it"] > 0
    rec = require_gate(d)
    assert rec["gate_status"] == "passed" and not rec["overridden"]
    assert {c["name"]: c["status"] for c in rec["checks"]}["l0_target"] == "passed"


@pytest.mark.slow
def test_mediated_crosscoder_finds_it_only_latents(tmp_path: Path, mediated) -> None:
    """Acceptance: PT+IT crosscoder; each planted mediator is an IT-only latent (PT decoder ~0).

    The `mediated` organism plants no shared sparse feature in its final MLP (PT's final MLP output is
    dense small noise), so the shared half of the claim is tested on synthetic data in test_saes_train.
    """
    pt, it, expected, cache = mediated
    med = expected["mediators"]
    dirs = torch.tensor(med["directions"])
    cfg = fast_config("batchtopk_crosscoder", layer=med["layer"], width=16, k=0.5, training_tokens=100_000)
    x = train_dictionary(cfg, cache, tmp_path, models={"it": it, "pt": pt})
    W_it, W_pt = x.W_dec["it"], x.W_dec["pt"]
    best = (dirs @ _unit(W_it).T).argmax(-1)  # [4]
    cos = (dirs @ _unit(W_it).T).max(-1).values
    rel_pt = (W_pt.norm(dim=-1) / (W_pt.norm(dim=-1) + W_it.norm(dim=-1)))[best]
    assert cos.min() >= 0.9 and rel_pt.max() <= 0.1, (cos, rel_pt)
    m = x.meta["metrics"]
    assert m["fve_it"] >= 0.75
    # PT's final MLP output is dense noise the crosscoder cannot explain: gate fails honestly on PT.
    checks = {c["name"]: c for c in x.meta["gate"]["checks"]}
    assert checks["fve_pt"]["passed"] is (m["fve_pt"] >= 0.75)


def test_gate_failure_is_kept_refused_and_overridable(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    cfg = make_config("topk", layer=4, width=2, k=1, training_tokens=2560, batch_size=128)
    d = train_dictionary(cfg, src, tmp_path)  # 2 latents for 12 directions: far below the gate
    assert d.gate_status == "failed" and d.meta["metrics"]["fve_it"] < 0.75
    assert (tmp_path / "sae_weights.safetensors").exists()  # kept
    with pytest.raises(
        GateFailedError, match=r"gate status 'failed': .*fve_it -?\d\.\d+ \(>= 0.75\): failed"
    ):
        require_gate(d)
    rec = require_gate(d, override=True, reason="ablation study")
    assert rec["overridden"] and rec["gate_status"] == "failed"
    again = load_dictionary(tmp_path)
    assert again.meta["gate"]["overrides"][0]["reason"] == "ablation study"
    # a looser gate passes the same dictionary; the status is rewritten on disk
    loose = GateConfig(min_fve=-1.0, min_heldout_tokens=1000, alive_range=None)
    evaluate_dictionary(again, src, gate=loose)
    assert json.loads((tmp_path / "crosspatch_meta.json").read_text())["gate"]["status"] == "passed"
    evaluate_dictionary(again, src, gate=GateConfig(min_fve=-1.0, min_heldout_tokens=1000))
    alive = {c["name"]: c for c in again.meta["gate"]["checks"]}["alive_fraction"]
    assert again.gate_status == "failed" and alive["status"] == "failed" and alive["value"] == 1.0


def test_splice_leaves_no_hooks_and_zero_reconstruction_is_zero_ablation(
    tmp_path: Path, tiny_cache, tiny_llamas
) -> None:
    _, it = tiny_llamas
    cfg = make_config("topk", layer=4, width=16, k=2, training_tokens=1280, batch_size=128, model_role="it")
    d = train_dictionary(cfg, tiny_cache, tmp_path, evaluate=False)
    seqs = tiny_cache.sequences("heldout")
    with torch.no_grad():  # a dictionary whose reconstruction is 0 everywhere
        d.sae.b_enc.fill_(-1e6)  # nothing fires
        d.sae.b_dec.zero_()
    m = splice_metrics(d, it, seqs)
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_zero_ablated"], abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4) and m["kl"] > 0
    assert not it.model.layers[4].mlp._forward_hooks
