"""The controls of the 2x2 through the service: real server, real worker, rows in DuckDB.

`llama_paper_sized` plants an upstream-dependent late push (interaction about +2) at first divergences,
weaker pushes elsewhere in the rollouts and none before the first divergence; `llama_lineage` has three
cumulative descendants of one base (sft < dpo < final) and a `portable` one (interaction exactly 0);
`llama_two_descendants` has a second descendant (`stages/b`) whose rank-1 closure of the first's gap is
planted (`expected.json["closure"]`).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from crosspatch.app.config import Settings
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.prompts import load_prompts
from tests.app.builders import rows_where
from tests.app.live import client, finished_job, live_service

pytestmark = pytest.mark.slow
PAPER, LINEAGE, TWO = "llama_paper_sized", "llama_lineage", "llama_two_descendants"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("controls")
    orgs = {name: organism_path(name) for name in (PAPER, LINEAGE, TWO)}
    settings = Settings(
        data_dir=root / "data",
        model_roots=sorted({o.parent for o in orgs.values()}),
        lease_seconds=10.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
        _env_file=None,  # type: ignore[call-arg]
    )
    users = {"root": "admin", "ada": "researcher"}
    pairs = {name: ("llama", org / "pt", org / "it") for name, org in orgs.items()}
    pairs[f"{TWO}_b"] = ("llama", orgs[TWO] / "pt", orgs[TWO] / "stages" / "b")  # the second descendant
    with live_service(settings, users, pairs, worker_log=root / "worker.log") as (server, keys):
        yield {"server": server, "keys": keys, "orgs": orgs}


def _prompts(org, limit: int) -> list[dict]:
    return [{"id": p.id, "text": p.text} for p in load_prompts(org / "prompts.jsonl", limit=limit)]


def _run(c: httpx.Client, spec: dict) -> str:
    r = c.post("/jobs", json={"spec": spec})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = finished_job(c, job_id)
    assert job["status"] == "succeeded", (job, c.get(f"/jobs/{job_id}/logs").json())
    return job_id


def _rows(c: httpx.Client, job_id: str, table: str) -> list[dict]:
    r = c.get(f"/jobs/{job_id}/results/{table}", params={"limit": 10_000})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_crosspatch_job_with_every_control(env: dict) -> None:
    spec = {
        "kind": "crosspatch",
        "pair_id": PAPER,
        "prompts": _prompts(env["orgs"][PAPER], 12),
        "max_new_tokens": 16,
        "n_resamples": 200,
        "controls": ["offmanifold", "commitment", "baselines", "native_history", "anatomy", "closure"],
        "control_options": {"seeds": [0, 1], "rollout_tokens": 16, "horizons": [4, 8]}
        | ANATOMY_CLOSURE_OPTIONS,
    }
    with client(env["server"], env["keys"]["ada"]) as c:
        job_id = _run(c, spec)
        cells = _rows(c, job_id, "cells")
        summaries = _rows(c, job_id, "summaries")
        interp = _rows(c, job_id, "interpolation")
        offm = {r["statistic"]: r for r in _rows(c, job_id, "offmanifold") if r["statistic"] != "curve"}
        base = {r["condition"]: r for r in _rows(c, job_id, "baselines")}
        base_cells = _rows(c, job_id, "baseline_cells")
        commitment = {r["view"]: r for r in _rows(c, job_id, "commitment")}
        margins = _rows(c, job_id, "boundary_margins")
        prov = c.get(f"/jobs/{job_id}/provenance").json()["provenance"]
        logs = [e["message"] for e in c.get(f"/jobs/{job_id}/logs").json()["data"]]
        figures = {f["name"] for f in c.get(f"/jobs/{job_id}/figures").json()["data"]}
        png = c.get(f"/jobs/{job_id}/figures/interpolation.png")
        extra = {t: _rows(c, job_id, t) for t in ("anatomy", "anatomy_events", "closure", "closure_cells")}
        parquet = {  # as the demo and the client download them
            t: c.get(f"/jobs/{job_id}/results/{t}", params={"format": "parquet"}).content
            for t in ("offmanifold", "commitment")
        }

    headline = cells[0]["headline_boundary"]
    # off-manifold: the interaction grows along the straight PT -> IT path; random directions do little
    slope = offm["slope"]
    assert slope["boundary"] == headline and slope["n"] == 12
    assert slope["ci_low"] > 0 and slope["estimate"] > 1.0
    assert offm["signperm_ratio"]["estimate"] < 0.3 and offm["signperm_ratio"]["ci_high"] < 0.5
    # C(1) of every event is exactly its 2x2 interaction at the headline boundary (same late stacks)
    inter = {r["prompt_id"]: r["interaction"] for r in cells if r["boundary"] == headline}
    ends = {r["prompt_id"]: r["contrast"] for r in interp if r["alpha"] == 1.0}
    assert set(ends) == set(inter) and all(ends[p] == pytest.approx(inter[p], abs=1e-6) for p in inter)
    # selection baselines: first divergence > random disagreement > pre-divergence ~ 0
    first, rand, pre = base["first_divergence"], base["random_balanced"], base["pre_divergence"]
    assert first["interaction"] > rand["interaction"] > pre["interaction"]
    assert first["ci_low"] > rand["ci_high"] and rand["ci_low"] > 0
    assert abs(pre["interaction"]) < 1e-4 and 0 < rand["share"] < 1 and first["share"] == 1.0
    assert {"native_pt_history", "native_it_history"} <= set(base) and base["native_pt_history"]["ci_low"] > 0
    assert {r["condition"] for r in base_cells} >= {"first_divergence", "pre_divergence", "native_pt_history"}
    noop = prov["controls"][PAPER]["native_history_noop"]
    assert set(noop) == {"pt", "it"} and all(max(r["max_abs_diff"].values()) < 1e-4 for r in noop.values())
    # commitment: positive among events whose boundary readout does not yet favour t_IT
    assert (
        len(margins) == 12
        and commitment["uncommitted"]["ci_low"] > 0
        and commitment["intercept"]["ci_low"] > 0
    )
    # secondary scales in the summary by default; the printed report lines in the job log
    scales = {
        r["statistic"]: r
        for r in rows_where(summaries, level="pair", headline=True, subset="all")
        if r["statistic"].endswith("_share")
    }
    pt_late = sum(r["pt_late_effect"] for r in cells if r["boundary"] == headline)
    it_late = sum(r["it_late_effect"] for r in cells if r["boundary"] == headline)
    assert scales["portable_share"]["estimate"] == pytest.approx(pt_late / it_late, abs=1e-9)
    assert 0 < scales["interaction_share"]["ci_low"] < scales["interaction_share"]["ci_high"] < 1.5
    assert any(m.startswith("off-manifold") and "interpolation slope" in m for m in logs)
    _check_anatomy_closure(extra, cells, figures, logs)
    assert any(m.startswith("baselines") and "pre_divergence" in m for m in logs)
    assert {"family_2x2", "interpolation", "baselines"} <= {f.removesuffix(".png") for f in figures}
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    import io

    import pyarrow.parquet as pq

    from crosspatch.engine.control_suite import format_controls

    printed = format_controls({t: pq.read_table(io.BytesIO(b)) for t, b in parquet.items()})
    assert printed.splitlines()[0].startswith(
        f"off-manifold  {PAPER} (b={headline}, n=12): interpolation slope +"
    )
    assert "uncommitted (margin <= 0)" in printed


def test_lineage_job_scores_stages_in_planted_order(env: dict) -> None:
    org = env["orgs"][LINEAGE]
    stages = [{"name": n, "path": str(org / "stages" / n)} for n in ("sft", "dpo")]
    stages += [
        {"name": "final", "pair_id": LINEAGE},
        {"name": "portable", "path": str(org / "stages" / "portable")},
    ]
    spec = {
        "kind": "lineage",
        "pair_id": LINEAGE,
        "prompts": _prompts(org, 16),
        "stages": stages,
        "reference": "final",
        "contrasts": [["final", "sft"], ["portable", "final"]],
        "n_resamples": 300,
        "n_permutations": 999,
    }
    with client(env["server"], env["keys"]["ada"]) as c:
        one = {**spec, "reference": None, "contrasts": []}
        bad = c.post("/jobs", json={"spec": {**one, "stages": [{"name": "x", "path": "/etc"}]}})
        assert bad.status_code == 422 and "spec.stages.0.path" in bad.text
        bad = c.post("/jobs", json={"spec": {**one, "stages": [{"name": "final", "pair_id": "nope"}]}})
        assert bad.status_code == 422 and "unknown pair" in bad.text
        bad = c.post("/jobs", json={"spec": {**spec, "reference": "rlhf"}})
        assert bad.status_code == 422 and "not one of the stages" in bad.text
        job_id = _run(c, spec)
        rows = _rows(c, job_id, "lineage")
        cells = _rows(c, job_id, "lineage_cells")
        contrasts = {(r["stage_a"], r["stage_b"]): r for r in _rows(c, job_id, "recipe_contrasts")}
        figures = {f["name"].removesuffix(".png") for f in c.get(f"/jobs/{job_id}/figures").json()["data"]}
        events = _rows(c, job_id, "events")

    assert [r["stage"] for r in rows] == ["sft", "dpo", "final", "portable"]
    assert figures == {"lineage"} and {e["event"] for e in events} == {"first_diff"}
    by = {r["stage"]: r for r in rows}
    sft, dpo, final, port = by["sft"], by["dpo"], by["final"], by["portable"]
    n = final["n"]
    assert n >= 12 and len(cells) == 4 * n and {r["pair_id"] for r in cells} == {f"{LINEAGE}~{s}" for s in by}
    assert sft["ci_low"] > 0 and sft["ci_high"] < dpo["ci_low"] and dpo["ci_high"] < final["ci_low"]
    assert sft["share_of_reference"] < dpo["share_of_reference"] < final["share_of_reference"] == 1.0
    assert final["native_top1_rate"] == 1.0 and final["p_value"] <= 1 / 1000
    assert port["ci_low"] <= 0 <= port["ci_high"] and port["portable_share"] == pytest.approx(1.0, abs=1e-6)
    # contrasts on the same support: per-prompt differences, sign-flip null
    fs = contrasts[("final", "sft")]
    assert fs["estimate"] == pytest.approx(final["interaction"] - sft["interaction"], abs=1e-9)
    assert fs["ci_low"] > 0 and fs["p_value"] <= 1 / 1000 and fs["n"] == n
    pf = contrasts[("portable", "final")]
    assert pf["estimate"] < 0 and pf["p_value"] > 0.9


ANATOMY_CLOSURE_OPTIONS = {"windows": [1], "ranks": [1, 8, "full"], "closure_alphas": [0.0, 1.0]}


def _check_anatomy_closure(
    tables: dict[str, list[dict]], cells: list[dict], figures: set, logs: list[str]
) -> None:
    """`controls: [anatomy, closure]` of the 12-prompt `llama_paper_sized` job: rows in DuckDB, figure, log lines."""
    headline = cells[0]["headline_boundary"]
    inter = sum(r["interaction"] for r in cells if r["boundary"] == headline) / 12
    anatomy = {(r["statistic"], r["k"], r["band"]): r for r in tables["anatomy"]}
    full = anatomy[("full_late_interaction", 2, None)]
    assert full["boundary"] == headline and full["estimate"] == pytest.approx(inter, abs=1e-6)
    assert 0 < anatomy[("final_k_retention", 1, None)]["estimate"] < 1  # blocks 3 and 4 both carry it
    assert len(tables["anatomy_events"]) == 12 * (1 + 2 + 3)  # full, (final_k, final_mlp) x 1 window, 3 bands
    closure = tables["closure"]
    by = {(r["arm"], r["full_delta"], r["rank"], r["alpha"]): r for r in closure}
    assert {(r["n_fit"], r["n_test"]) for r in closure} == {(6, 6)}
    assert by[("pca", False, 1, 0.0)]["closure"] == 0.0
    assert (
        by[("pca", True, 64, 1.0)]["closure"] > 0.9 and abs(by[("gaussian", True, 64, 1.0)]["closure"]) < 0.15
    )
    rank8 = by[("pca", False, 8, 1.0)]
    assert not rank8["valid"] and rank8["closure"] is None and "the fit split has 6" in rank8["reason"]
    assert {r["arm"] for r in tables["closure_cells"]} == {"pca", "gaussian", "random", "sign_flip"}
    assert any(f.startswith("closure") for f in figures)
    assert any(m.startswith("anatomy") and "final_k_retention k=1" in m for m in logs)


def test_wrong_descendant_closure_through_the_service(env: dict) -> None:
    """A second descendant by path: the job's wrong-descendant closure equals the library's (same events,
    split and options) and the planted fraction (tolerance 0.01 as in tests/engine/test_closure.py);
    bad references are a 422 naming the field."""
    import json

    from crosspatch.engine.admission import OVERHEAD, read_shape
    from crosspatch.engine.closure import closure
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.pairs import load_pair

    org = env["orgs"][TWO]
    options = {"ranks": [1, "full"], "closure_alphas": [0.0, 1.0], "closure_boundaries": [3, 4]}
    spec = {
        "kind": "crosspatch",
        "pair_id": TWO,
        "prompts": _prompts(org, 12),
        "max_new_tokens": 16,
        "batch_size": 6,
        "n_resamples": 200,
        "controls": ["identity_transfer", "source_decomposition", "closure"],
        "control_options": options | {"wrong_descendant": {"path": str(org / "stages" / "b")}},
    }
    field = "spec.control_options.wrong_descendant"
    with client(env["server"], env["keys"]["ada"]) as c:

        def refused(**opts) -> str:
            r = c.post("/jobs", json={"spec": {**spec, "control_options": options | opts}})
            assert r.status_code == 422, r.text
            return r.text

        assert "not a model directory" in refused(wrong_descendant={"path": str(org / "prompts.jsonl")})
        assert f"{field}.path" in refused(wrong_descendant={"path": "/etc"})
        assert "unknown pair 'nope'" in refused(wrong_descendant={"pair_id": "nope"})
        assert "exactly one of 'pair_id' or 'path'" in refused(wrong_descendant={})
        assert "boundary 9 out of range" in refused(closure_boundaries=[3, 9])
        # the submit-time memory estimate counts the second descendant as a third resident model
        alone = c.post("/jobs", json={"spec": {**spec, "control_options": options}, "priority": -10})
        assert alone.status_code == 201, alone.text
        assert c.post(f"/jobs/{alone.json()['id']}/cancel").status_code == 200
        assert finished_job(c, alone.json()["id"])["status"] == "cancelled"
        job_id = _run(c, spec)
        third = int(read_shape(org / "pt").n_params * 4 * (1 + OVERHEAD))  # fp32 weights + overhead
        with_third = c.get(f"/jobs/{job_id}").json()["estimated_memory_bytes"]
        assert with_third - alone.json()["estimated_memory_bytes"] == third > 0
        rows = _rows(c, job_id, "closure")
        anatomy = {t: _rows(c, job_id, t) for t in ("identity_transfer", "source_decomposition")}
        logs = [e["message"] for e in c.get(f"/jobs/{job_id}/logs").json()["data"]]
        by_id = {**spec, "controls": ["closure"]}
        by_id["control_options"] = options | {"wrong_descendant": {"pair_id": f"{TWO}_b"}}
        again = _rows(c, _run(c, by_id), "closure")  # the same descendant as a registered pair's IT

    pair = load_pair(org / "pt", org / "it")
    wrong = load_pair(org / "pt", org / "stages" / "b")
    events = find_divergences(pair, load_prompts(org / "prompts.jsonl", limit=12), max_new_tokens=16)
    _, lib = closure(pair, events, [3, 4], "it", (1, "full"), (0.0, 1.0), batch_size=6, n_resamples=200,
                     wrong_descendant=wrong)  # fmt: skip
    expected = json.loads((org / "expected.json").read_text())["closure"]["wrong_descendant_rank1"]
    key = ("boundary", "arm", "full_delta", "rank", "alpha")
    library = {tuple(r[k] for k in key): r for r in lib.to_pylist()}
    assert len(rows) == len(library) and {r["boundary"] for r in rows} == {3, 4}
    for r in rows:
        mine = library[tuple(r[k] for k in key)]
        assert r["valid"] == mine["valid"] and r["n_test"] == mine["n_test"]
        if r["valid"]:
            assert r["closure"] == pytest.approx(mine["closure"], abs=1e-6)
    assert again == rows  # a registered pair's IT is the same second descendant as its path
    for b in (3, 4):
        (row,) = [
            r
            for r in rows
            if (r["boundary"], r["arm"], r["rank"], r["alpha"]) == (b, "wrong_descendant", 1, 1.0)
        ]
        assert row["valid"] and row["closure"] == pytest.approx(expected, abs=0.01) and row["ci_low"] > 0.2
    assert any(m.startswith("closure") and "wrong_descendant rank 1" in m for m in logs)
    # the 4.8 controls ride along: rows in DuckDB and their report lines in the job log
    assert {r["window_name"] for r in anatomy["identity_transfer"]} >= {"late", "final_3"}
    assert {r["source"] for r in anatomy["source_decomposition"]} == {"all", "embedding", "attention", "mlp"}
    assert any(m.startswith("transfer") for m in logs) and any(m.startswith("sources") for m in logs)
