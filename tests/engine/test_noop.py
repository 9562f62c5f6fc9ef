"""Runtime no-op checks (method §2.1): measured on the first batch, recorded, and fatal when broken."""

from __future__ import annotations

import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.errors import NoopCheckError
from crosspatch.engine.mediation import DirectionDictionary, MediationConfig, mediate
from crosspatch.engine.noop import check_mediation_noop, noop_report, tolerance
from crosspatch.engine.organisms.tiny import FAMILIES, forced_events

CHECKS = {"pt_diagonal_vs_hf", "it_diagonal_vs_hf", "pt_self_patch", "it_self_patch"}


def _events(pair, n=6, seed=0):
    """Diverged events on fixed tokens (valid for every tiny pair)."""
    return forced_events(pair, random_prompts(n, seed=seed, min_len=3, max_len=9))


def _dictionary(pair, scale: float = 1.0) -> DirectionDictionary:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(16, pair.it_adapter.d_model, generator=g)
    return DirectionDictionary("rand", pair.n_layers - 1, scale * rows / rows.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_checks_pass_and_are_recorded_per_family(family):
    pair = tiny_pair(family, it_scale=0.05)
    events = _events(pair)
    cells = crosspatch(pair, events, boundary="sweep", batch_size=4)
    report = noop_report(cells)
    assert report is not None and report["passed"]
    assert set(report["max_abs_diff"]) == CHECKS
    assert report["boundaries"] == list(range(1, pair.n_layers))
    assert (report["dtype"], report["tolerance"], report["n_events"]) == ("float32", 1e-4, 4)
    assert max(report["max_abs_diff"].values()) <= 1e-4
    assert report["max_abs_diff"]["pt_self_patch"] == 0.0  # the same blocks on the same residual

    med = check_mediation_noop(pair, events, [_dictionary(pair)], boundary=pair.default_boundary)
    assert med is not None and med.passed and med.max_abs_diff["it_splice"] <= 1e-4
    assert set(med.max_abs_diff) == CHECKS | {"it_splice"}


def test_tampered_late_stack_fails_with_the_noop_reason():
    pair = tiny_pair("llama", it_scale=0.05)
    blocks = pair.it_adapter.blocks
    pair.it_adapter.blocks = torch.nn.ModuleList([*blocks[:-2], blocks[-1], blocks[-2]])  # last two swapped
    with pytest.raises(NoopCheckError, match="it_diagonal_vs_hf") as e:
        crosspatch(pair, _events(pair))
    assert "pt_diagonal" not in str(e.value)  # PT is intact
    cells = crosspatch(pair, _events(pair), check_noop=False)  # the opt-out scores anyway
    assert cells.num_rows == 6 and noop_report(cells) is None


def test_mediation_records_the_splice_check_and_refuses_an_unstable_splice():
    pair = tiny_pair("llama", it_scale=0.05)
    events = _events(pair, n=8)
    cfg = MediationConfig(top_k=2, ks=(2,), n_resamples=50, batch_size=4)
    result = mediate(pair, events, [_dictionary(pair)], cfg)
    assert result.noop["passed"] and result.noop["max_abs_diff"]["it_splice"] <= 1e-4
    # decoder rows of norm 1e12: x = recon + (x - recon) loses x entirely in fp32
    with pytest.raises(NoopCheckError, match="it_splice"):
        mediate(pair, events, [_dictionary(pair, scale=1e12)], cfg)


def test_half_precision_tolerance_is_a_few_ulps_of_the_logits():
    assert tolerance(torch.float32, 50.0) == 1e-4
    assert tolerance(torch.bfloat16, 20.0) == pytest.approx(4 * 2**-7 * 20.0)
    assert tolerance(torch.float16, 0.5) == pytest.approx(4 * 2**-10)
