"""A pipeline pair whose dictionary fails its quality gate makes no feature claims (method 5.1) and the job goes on.

The method excludes a family whose dictionaries fail the gate from feature claims (OLMo in the paper)
while its 2x2 stands; a pipeline job does the same instead of failing: the pair's 2x2 cells, its gate rows
(with the failed check) and the reason in provenance, and no mediation rows.
"""

from __future__ import annotations

from crosspatch.app.config import Settings
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from tests.app.builders import run_job_in_process

ORGANISM = "llama_mediated"


def test_a_pair_below_the_gate_is_excluded_from_feature_claims(settings: Settings) -> None:
    org = organism_path(ORGANISM)
    prompts = [{"id": p.id, "text": p.text} for p in load_prompts(org / "prompts.jsonl")][:24]
    spec = {
        "kind": "pipeline",
        "pair_ids": [ORGANISM],
        "prompts": prompts,
        "max_new_tokens": 8,
        "n_resamples": 100,
        "boundary": 3,
        # a held-out minimum no tiny cache reaches: the gate's `heldout_tokens` check fails
        "dictionary": {"width": 32, "k": 2, "training_tokens": 2_000, "min_heldout_tokens": 10**9},
        "mediation": {"top_k": 2, "ks": [2]},
    }
    job, results = run_job_in_process(settings, load_pair(org / "pt", org / "it", pair_id=ORGANISM), spec)
    assert job.status == "succeeded"
    reason = job.provenance["excluded_from_features"][ORGANISM]
    assert "heldout_tokens" in reason and "failed" in reason
    cells = results.job_table("cells", str(job.id), limit=1000).to_pylist()
    assert cells and all(r["pair_id"] == ORGANISM for r in cells)  # the 2x2 stands
    checks = {
        r["check_name"]: r for r in results.job_table("gate_checks", str(job.id), limit=100).to_pylist()
    }
    assert checks["heldout_tokens"]["passed"] is False
    fve = checks["fve_it"]["value"]  # measured and judged even though another check failed
    assert isinstance(fve, float) and fve <= 1.0 and checks["fve_it"]["passed"] is (fve >= 0.75)
    assert results.job_table("feature_effects", str(job.id), limit=10).num_rows == 0  # no feature claims
    assert results.job_table("feature_acts", str(job.id), limit=10).num_rows == 0
