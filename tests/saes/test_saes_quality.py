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
def test_mediated_sae_passes_gate_but_fuses_the_mediators(tmp_path: Path, mediated) -> None:
    """An SAE on IT's final-MLP output of `mediated` passes the gate and splices faithfully, but does not keep
    every mediator as one clean latent: on IT alone a mediator always co-occurs with the word-group background
    of its word, so BatchTopK saves activations by fusing them (measured min cos 0.46-0.74 over seeds 0-3).
    The paired crosscoder (next test) separates them, because PT's branch anchors the background as shared:
    the reason the pipeline's default dictionary is the crosscoder (method 5.1)."""
    _pt, it, expected, cache = mediated
    med = expected["mediators"]
    layer, dirs = med["layer"], torch.tensor(med["directions"])  # [4, d_model]
    # k = 1.5: one background feature on every token, a mediator on about half of them
    cfg = fast_config("batchtopk", layer=layer, width=64, k=1.5, training_tokens=200_000)
    # explicit, lowered gate settings for a 10k-token organism cache with 20 planted features in 64 latents
    gate = GateConfig(min_heldout_tokens=500, alive_range=(0.01, 0.5))
    d = train_dictionary(cfg, cache, tmp_path, models={"it": it}, gate=gate)
    cos = (dirs @ _unit(d.W_dec["it"]).T).max(-1).values
    assert cos.min() < 0.9, cos
    m = d.meta["metrics"]
    assert d.gate_status == "passed" and m["fve_it"] >= 0.75
    # splicing the reconstruction barely moves IT's next-token distribution (measured KL 0.003, delta CE 0.15)
    assert m["kl_it"] < 0.05 and abs(m["delta_ce_it"]) < 0.3
    assert m["n_splice_tokens_it"] > 0
    rec = require_gate(d)
    assert rec["gate_status"] == "passed" and not rec["overridden"]
    assert {c["name"]: c["status"] for c in rec["checks"]}["l0_target"] == "passed"


@pytest.mark.slow
def test_mediated_crosscoder_finds_it_only_latents(tmp_path: Path, mediated) -> None:
    """Acceptance: PT+IT crosscoder on the same cache; each planted mediator is an IT-only latent (PT decoder
    ~0), each word-group background feature (the same neuron in PT's and IT's final MLP) a shared one (PT
    share ~0.55: PT's branch is scaled up, having no mediators), and the gate passes on both branches."""
    pt, it, expected, cache = mediated
    med, bg = expected["mediators"], expected["background"]
    cfg = fast_config(
        "batchtopk_crosscoder",
        layer=med["layer"],
        width=128,
        k=1.5,
        training_tokens=400_000,
        balance_branches=True,
    )
    gate = GateConfig(min_heldout_tokens=500, alive_range=(0.01, 0.5))
    x = train_dictionary(cfg, cache, tmp_path, models={"it": it, "pt": pt}, gate=gate)
    W_it, W_pt = x.W_dec["it"], x.W_dec["pt"]
    rel_pt = W_pt.norm(dim=-1) / (W_pt.norm(dim=-1) + W_it.norm(dim=-1))  # [F]
    # (directions, min cos, PT share range); measured over seeds 0-3: mediators cos >= 0.999, share <= 0.033;
    # background min cos 0.81-0.98 (one group's latent sometimes split), share 0.53-0.56
    for directions, min_cos, lo, hi in (
        (med["directions"], 0.99, 0.0, 0.05),
        (bg["directions"], 0.8, 0.4, 0.6),
    ):
        cos, best = (torch.tensor(directions) @ _unit(W_it).T).max(-1)  # [n]
        assert cos.min() >= min_cos and lo <= rel_pt[best].min() and rel_pt[best].max() <= hi, (
            cos,
            rel_pt[best],
        )
    m = x.meta["metrics"]
    assert x.gate_status == "passed" and m["fve_it"] >= 0.75 and m["fve_pt"] >= 0.75, m


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
