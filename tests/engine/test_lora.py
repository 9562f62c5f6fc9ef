"""Domain-training controls (§4.2) on `trained_llama` with a small synthetic domain corpus.

Measured (seed 0, CPU fp32): 40 steps of LoRA r 4 at lr 1e-3 improve held-out domain NLL 6.62 -> 4.86 nats
(26.6%, gate 2%), merged == base + adapter to ~4e-6, generations healthy; its 2x2 on the domain support is
-0.003 [-0.010, +0.004] (covers 0, like the paper's code CPT). One step at lr 1e-5 learns nothing: not valid,
and no interaction is reported for it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from crosspatch.engine.lora import LoraControlConfig, control_crosspatch, control_row, train_lora_control
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_model
from crosspatch.engine.prompts import PromptRecord

NOUNS, COLOURS = ("cat", "dog", "fox", "owl"), ("red", "blue", "green")


def corpus(n: int, seed: int) -> list[str]:
    """A synthetic 'domain': one sentence template over a few words."""
    r = random.Random(seed)
    return [f"the {r.choice(COLOURS)} {r.choice(NOUNS)} sees the {r.choice(NOUNS)} ." for _ in range(n)]


def _cfg(**kw) -> LoraControlConfig:
    base = dict(rank=4, alpha=8, lr=1e-3, seq_len=16, batch_size=8, train_tokens=16 * 8 * 40)
    return LoraControlConfig(**{**base, "min_nll_improvement": 0.02, "health_tokens": 12, **kw})


def _train(out: Path, cfg: LoraControlConfig, **kw):
    base, tok = load_model(organism_path("trained_llama") / "pt")
    return train_lora_control(base, tok, corpus(200, 0), corpus(40, 1), out, cfg, **kw)


def test_verified_control_has_no_interaction_and_a_brief_one_is_not_valid(tmp_path: Path) -> None:
    domain = [PromptRecord(id=f"d{i}", text=" ".join(t.split()[:3])) for i, t in enumerate(corpus(40, 2))]
    control = _train(tmp_path / "ok", _cfg())
    v = control.verification
    assert control.status == "valid" and v.failed == []
    assert v.nll_improvement >= 0.02 and v.nll_improvement == pytest.approx(0.2655, abs=0.02)
    assert v.merge_max_diff < 1e-4
    base, tok = load_model(organism_path("trained_llama") / "pt")
    record, cells, _ = control_crosspatch(control, base, tok, domain, n_resamples=1000)
    assert cells is not None and cells.num_rows == 40
    inter = record["interaction"]
    assert inter["n"] == 40 and inter["ci_low"] <= 0 <= inter["ci_high"] and abs(inter["mean"]) < 0.05
    saved = json.loads((tmp_path / "ok" / "control.json").read_text())
    assert saved["status"] == "valid" and saved["verification"]["nll_improvement"] == v.nll_improvement

    brief = _train(tmp_path / "brief", _cfg(lr=1e-5, train_tokens=16 * 8))
    assert brief.status == "not_valid" and brief.verification.failed == ["domain_nll"]
    assert brief.verification.nll_improvement < 0.02
    record, cells, events = control_crosspatch(brief, base, tok, domain)
    assert record["interaction"] is None and cells is None and events == []
    row = control_row(record, "llama", "p")
    assert (
        row["status"] == "not_valid" and row["failed_checks"] == "domain_nll" and row["interaction"] is None
    )


def test_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(train_tokens=16 * 8 * 12, checkpoint_every=5)
    whole = _train(tmp_path / "whole", cfg)

    def crash(step: int, total: int, loss: float) -> None:
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "resumed", cfg, on_step=crash)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    resumed = _train(tmp_path / "resumed", cfg)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    a, _ = load_model(whole.merged_dir)
    b, _ = load_model(resumed.merged_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraControlConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        LoraControlConfig(targets=())
