"""The pipeline job end to end on a planted organism: real server, real worker, real DuckDB.

`llama_mediated` plants the upstream-dependent effect in four known final-MLP directions, so a pipeline
(divergence -> 2x2 -> its default dictionary, a paired PT/IT crosscoder on the final MLP -> mediation) must
find a large interaction, a crosscoder that passes the full gate on both branches with the planted latents
IT-only, and top-k features whose ablation removes far more of it than matched-random sets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from crosspatch.engine.organisms import load_expected, organism_path
from crosspatch.engine.prompts import load_prompts
from tests.app.live import client, finished_job, live_service, live_settings

pytestmark = pytest.mark.slow
ORGANISM = "llama_mediated"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("pipeline")
    org = organism_path(ORGANISM)
    settings = live_settings(
        root,
        [org.parent],
        dictionary_roots=[root / "data"],
        lease_seconds=10.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
    )
    users = {"root": "admin", "ada": "researcher"}
    pairs = {ORGANISM: ("llama", org / "pt", org / "it")}
    with live_service(settings, users, pairs, worker_log=root / "worker.log") as (server, keys):
        yield {"server": server, "keys": keys, "settings": settings, "org": org}


@pytest.fixture(scope="module")
def pipeline_job(env: dict) -> dict:
    """One pipeline job on the organism (its default dictionary), run to success; its id and prompts."""
    prompts = [
        {"id": p.id, "text": p.text, "category": p.category}
        for p in load_prompts(env["org"] / "prompts.jsonl")
    ]
    spec = {
        "kind": "pipeline",
        "pair_ids": [ORGANISM],
        "prompts": prompts,
        "max_new_tokens": 16,
        "n_resamples": 200,
        "boundary": "sweep",  # mediation must run at the headline boundary, not at boundaries[0] = 1
        # the default dictionary: a paired PT/IT BatchTopK crosscoder (method 5.1). IT's final MLP writes
        # through 4 planted neurons (at most one per token, about half the tokens); PT's and IT's both write
        # one word-group background feature on every token (16 groups): k = 1.5 is that true L0, width 256
        # leaves room for a small dense per-word term. Branches are balanced (the default).
        "dictionary": {
            "width": 256,
            "k": 1.5,
            "training_tokens": 600_000,
            "continuation_tokens": 160,
            "batch_size": 128,
            "lr": 3e-3,
            # the dictionary trains on the prompts outside the mediation test split: an explicit, lowered
            # held-out minimum for the tiny organism
            "min_heldout_tokens": 100,
            "max_alive_fraction": 0.6,
        },
        # the fit events' scored words fire their groups' shared background latents under either upstream:
        # active, not causal (score <= 0, through the final norm only), the matched-random pool
        "mediation": {"top_k": 4, "ks": [4], "neighbours": 2, "allow_failed_gate": False},
        "forced_tokens": True,  # method 6: forced tokens and constrained continuation per pair
        "continuation": True,
        # a control by flag: its rows land next to the cells, at the headline boundary
        "controls": ["offmanifold"],
        "control_options": {"seeds": [0]},
    }
    with client(env["server"], env["keys"]["ada"]) as c:
        r = c.post("/jobs", json={"spec": spec})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = finished_job(c, job_id)
        assert job["status"] == "succeeded", (job, c.get(f"/jobs/{job_id}/logs").json())
    return {"job_id": job_id, "prompts": prompts}


def test_pipeline_finds_the_planted_mediators(env: dict, pipeline_job: dict) -> None:
    job_id, prompts = pipeline_job["job_id"], pipeline_job["prompts"]
    with client(env["server"], env["keys"]["ada"]) as c:
        summaries = c.get(f"/jobs/{job_id}/results/summaries", params={"limit": 1000}).json()["data"]
        cells = c.get(f"/jobs/{job_id}/results/cells", params={"limit": 10_000}).json()["data"]
        effects = c.get(f"/jobs/{job_id}/results/feature_effects", params={"limit": 10_000}).json()["data"]
        gated = c.get("/features/top", params={"family": "llama", "limit": 4}).json()["data"]
        top = c.get(
            "/features/top", params={"family": "llama", "limit": 4, "include_failed_gate": "true"}
        ).json()["data"]
        provenance = c.get(f"/jobs/{job_id}/provenance").json()
        checks = c.get(f"/jobs/{job_id}/results/gate_checks", params={"limit": 100}).json()["data"]
        dicts = c.get("/dictionaries").json()["data"]
        curve = c.get("/features/curve", params={"family": "llama"}).json()["data"]
        families = c.get("/features/families").json()["data"]
        prov = c.get(f"/jobs/{job_id}/provenance").json()["provenance"]
        forced = c.get(f"/jobs/{job_id}/results/forced_tokens", params={"limit": 10_000}).json()["data"]
        cont = c.get(f"/jobs/{job_id}/results/continuation", params={"limit": 10_000}).json()["data"]
        offm = c.get(f"/jobs/{job_id}/results/offmanifold", params={"limit": 100}).json()["data"]

    # the service's cells equal the library's for the same inputs (one chunk, same batch size)
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import iter_divergences
    from crosspatch.engine.pairs import load_pair

    pair = load_pair(env["org"] / "pt", env["org"] / "it", family="llama", pair_id=ORGANISM)
    sweep = list(range(1, pair.n_layers))  # as the job: decoding keeps every boundary, the 2x2 runs fused
    records = load_prompts(env["org"] / "prompts.jsonl")
    events = [e for b in iter_divergences(pair, records, 16, 16, capture=sweep) for e in b]
    headline = round(0.6 * pair.n_layers)
    library = {r["prompt_id"]: r for r in crosspatch(pair, events, batch_size=16).to_pylist()}
    assert {r["boundary"] for r in cells} == set(range(1, pair.n_layers))
    assert {r["headline_boundary"] for r in cells} == {headline}
    cells = [r for r in cells if r["boundary"] == headline]
    assert {r["prompt_id"] for r in cells} == set(library)
    for row in cells:
        for col in ("y_ptup_ptlate", "y_ptup_itlate", "y_itup_ptlate", "y_itup_itlate", "interaction"):
            assert row[col] == pytest.approx(library[row["prompt_id"]][col], abs=1e-9), (col, row)

    # pipeline options: four forced branches per event; continuation at the headline boundary, N=0 = the 2x2
    assert len(forced) == 4 * len(cells) and {r["branch"] for r in forced} >= {"it", "pt"}
    n0 = {r["prompt_id"]: r["interaction"] for r in cont if r["n"] == 0 and r["variant"] == "native"}
    assert {r["boundary"] for r in cont} == {headline} and set(n0) == {r["prompt_id"] for r in cells}
    for row in cells:
        assert n0[row["prompt_id"]] == pytest.approx(row["interaction"], abs=1e-5)
    # the off-manifold control ran by flag at the headline boundary: C(a) grows along the PT -> IT path
    slope = next(r for r in offm if r["statistic"] == "slope")
    assert slope["pair_id"] == ORGANISM and slope["boundary"] == headline and slope["ci_low"] > 0
    assert prov["controls"][ORGANISM]["boundary"] == headline

    # the sweep's mediation ran at the pair's headline boundary round(0.6 L), not at the first swept one
    assert prov["pairs"][ORGANISM]["headline_boundary"] == headline
    assert prov["mediation_splits"][ORGANISM]["config"]["boundary"] == headline

    expected = load_expected(ORGANISM)
    inter = next(
        r
        for r in summaries
        if r["statistic"] == "interaction" and r["subset"] == "all" and r["level"] == "pair" and r["headline"]
    )
    assert inter["boundary"] == headline and inter["pair_id"] == ORGANISM
    lo, hi = expected["cells"]["interaction"]["lo"], expected["cells"]["interaction"]["hi"]
    assert lo <= inter["estimate"] <= hi and inter["ci_low"] > 0

    got = {(r["intervention"], r["statistic"]): r for r in effects if r["k"] == 4 and r["latent"] is None}
    # the crosscoder's IT branch alone (its encoder, its decoder) carries most of the interaction in the
    # 4 planted latents; rescuing them restores most of it
    assert got[("ablate_topk", "share")]["effect"] >= 0.5
    assert got[("rescue_topk", "rescue_fraction")]["effect"] >= 0.7
    # matched-random sets, drawn from active non-causal latents (the shared background), remove nothing
    status = provenance["provenance"]["mediation_splits"][ORGANISM]["controls"]["matched_random"]["by_k"]["4"]
    assert status["available"], status
    random_share = got[("ablate_matched_random", "share")]
    assert random_share["n"] > 0 and -0.1 < random_share["effect"] <= 0.05
    # the method's full gate holds on both branches: held-out tokens, FVE of PT and of IT, L0 within 10%
    # of k, alive fraction, a positive top-k causal drop and a matched-random drop <= 0.05
    by_name = {r["check_name"]: r for r in checks}
    assert by_name["topk_causal_drop"]["passed"] and by_name["topk_causal_drop"]["value"] > 0
    for name in ("fve_pt", "fve_it", "l0_target", "alive_fraction", "heldout_tokens", "matched_random_drop"):
        assert by_name[name]["passed"], by_name[name]
    assert by_name["fve_pt"]["value"] >= 0.75 and by_name["fve_it"]["value"] >= 0.75
    assert by_name["matched_random_drop"]["value"] <= 0.05
    full_gate = provenance["provenance"]["dictionaries"][ORGANISM]["gate_after_mediation"]
    assert full_gate["status"] == "passed" and full_gate["pending"] == []
    # so top-features shows the dictionary's latents without being asked, with held-out evidence
    assert [r["latent"] for r in gated] == [r["latent"] for r in top]
    assert all(r["gate_status"] == "passed" and not r["failed_checks"] for r in top)
    assert all(r["heldout_n"] == got[("ablate_topk", "share")]["n"] for r in top)
    assert sum(r["heldout_drop"] for r in top) > 0

    # the dictionary trained only on prompts outside the events mediation tested (recorded split)
    trained = set(prov["dictionaries"][ORGANISM]["training_prompt_ids"])
    tested = set(prov["mediation_splits"][ORGANISM]["test"])
    assert tested and trained.isdisjoint(tested) and trained == {p["id"] for p in prompts} - tested
    assert set(prov["mediation_splits"][ORGANISM]["fit"]) <= trained
    assert prov["mediation_splits"][ORGANISM]["dictionary_checks"][0]["test_overlap"] == 0
    gate = {c["name"]: c for c in prov["dictionaries"][ORGANISM]["gate"]["checks"]}
    assert gate["heldout_tokens"]["value"] >= 100 and gate["heldout_tokens"]["threshold"] == ">= 100"
    assert gate["topk_causal_drop"]["status"] == "pending"

    # the dictionary was registered with its gate, and its top latents point along the planted directions
    (d,) = [d for d in dicts if d["pair_id"] == ORGANISM]
    assert d["gate_status"] == "passed" and d["metrics"]["fve_min"] >= 0.75
    assert "crosscoder" in f"{d.get('architecture')} {d.get('kind')}", d
    from crosspatch.saes.load import load_dictionary

    dictionary = load_dictionary(d["path"])
    w_pt, w = dictionary.W_dec["pt"], dictionary.W_dec["it"]
    pt_share = w_pt.norm(dim=-1) / (w_pt.norm(dim=-1) + w.norm(dim=-1))  # [F]
    w = w / w.norm(dim=-1, keepdim=True)
    planted = torch.tensor(expected["mediators"]["directions"], dtype=w.dtype)
    top_latents = [r["latent"] for r in top]
    assert len(top_latents) == 4
    # the top latents point along planted directions (a mediator may split in two: cos per latent)
    assert ((planted @ w[top_latents].T).abs().max(dim=0).values >= 0.9).all()
    # every planted mediator is recovered as an IT-only latent: PT decoder share about 0
    cos, best = (planted @ w.T).max(dim=1)  # [4]
    assert (cos >= 0.99).all() and pt_share[best].max() <= 0.05, (cos, pt_share[best])
    assert pt_share[top_latents].max() <= 0.05, pt_share[top_latents]
    # the background latents the control drew from are shared: both branches decode them (PT share ~0.55)
    background = torch.tensor(expected["background"]["directions"], dtype=w.dtype)
    bg_cos, bg_best = (background @ w.T).max(dim=1)  # [16]
    assert (bg_cos >= 0.8).sum() >= 12 and (pt_share[bg_best[bg_cos >= 0.8]] > 0.3).all()
    assert {r["intervention"] for r in curve} >= {"ablate_topk", "ablate_matched_random"}
    assert any(r["family"] == "llama" and r["k"] == 4 for r in families)


def test_feature_page_of_a_planted_latent(env: dict, pipeline_job: dict, capsys) -> None:
    """The top latent's page: its planted events on top, a causal drop CI > 0, the planted token promoted."""
    from crosspatch.engine.organisms.tokenizer import ANSWER_WORDS
    from tests.helpers import cli_ok

    with client(env["server"], env["keys"]["ada"]) as c:
        top = c.get(
            "/features/top", params={"family": "llama", "limit": 4, "include_failed_gate": "true"}
        ).json()["data"]
        events = c.get(f"/jobs/{pipeline_job['job_id']}/results/events", params={"limit": 1000}).json()[
            "data"
        ]
        dict_id, latent = top[0]["dictionary_id"], top[0]["latent"]
        r = c.get(f"/features/page/{dict_id}/{latent}", params={"family": "llama"})
        assert r.status_code == 200, r.text
        page = r.json()
        missing = c.get(f"/features/page/{dict_id}/255", params={"family": "qwen3"})
        unknown = c.get("/features/page/no-such-dictionary/3")
    assert missing.status_code == 404 and "latent 255" in missing.json()["message"]
    assert unknown.status_code == 404 and "no-such-dictionary" in unknown.json()["message"]
    # the decoder row, read through IT's unembedding, promotes its class's planted answer word
    word = page["decoder_top_tokens"][0]["token"]
    assert word in ANSWER_WORDS and page["decoder_top_tokens"][0]["value"] > 0
    assert page["decoder_top_tokens"][0]["value"] > page["decoder_top_tokens"][1]["value"] + 0.5
    assert page["decoder_bottom_tokens"][0]["value"] <= page["decoder_top_tokens"][1]["value"]
    # its top events are the planted ones: IT diverges to that word, and the neuron needs IT's upstream u
    # (PT upstream: activation 0); every event of that class where the latent fired is among them
    planted = {e["prompt_id"] for e in events if e["diverged"] and e["t_it_text"] == word}
    shown = page["examples"]
    assert shown and {e["prompt_id"] for e in shown} <= planted
    assert all(e["context_after"] == word and e["activation"] > 0 for e in shown)
    assert all(abs(e["activation_ptup"] or 0.0) < 1e-3 * e["activation"] for e in shown)
    assert [e["activation"] for e in shown] == sorted((e["activation"] for e in shown), reverse=True)
    assert all(e["token"] and e["context_before"] for e in shown)
    # the held-out single-feature ablation drop and its CI, the fit attribution, histogram and gate
    assert (
        page["causal_drop_lo"] > 0 and page["causal_drop"] >= page["causal_drop_lo"] and page["causal_n"] > 0
    )
    assert page["causal_drop"] == pytest.approx(top[0]["heldout_drop"]) and page["attribution"] > 0
    assert len(shown) <= sum(b["count"] for b in page["histogram"]) <= page["n_events_active"]
    assert page["architecture"] == "crosscoder" and page["branch"] == "it"
    assert page["pt_decoder_share"] <= 0.05 and page["layer"] == 4
    gate = {g["name"]: g for g in page["gate"]}
    assert page["gate_passed"] is True and gate["matched_random_drop"]["status"] == "passed"
    assert gate["fve_pt"]["passed"] and gate["fve_it"]["passed"] and gate["fve_pt"]["threshold"] == ">= 0.75"
    assert page["label"] is None  # no labeller is registered by default
    # the CLI prints the same page, the scored token highlighted
    out = cli_ok(
        capsys,
        "feature",
        "llama",
        dict_id,
        str(latent),
        "--url",
        env["server"].url,
        "--key",
        env["keys"]["ada"],
    )
    assert f"feature {latent} of {dict_id}" in out and f"≪{shown[0]['token']}≫" in out
    assert "PT decoder share" in out and word in out


def test_mediation_and_load_dictionary_jobs_reuse_the_registered_dictionary(env: dict) -> None:
    """After the pipeline: a mediation job on its registered dictionary, and registering a copy by path."""
    prompts = [{"id": p.id, "text": p.text} for p in load_prompts(env["org"] / "prompts.jsonl")]
    with client(env["server"], env["keys"]["ada"]) as c:
        (d,) = [d for d in c.get("/dictionaries").json()["data"] if d["pair_id"] == ORGANISM]
        spec = {"kind": "mediation", "pair_id": ORGANISM, "dictionary_id": d["id"], "prompts": prompts}
        bad = c.post("/jobs", json={"spec": {**spec, "mediation": {"top_k": 257}}})
        assert bad.status_code == 422 and "exceeds" in bad.text  # width 256
        r = c.post(
            "/jobs",
            json={
                "spec": {
                    **spec,
                    "max_new_tokens": 16,
                    "mediation": {
                        "top_k": 4,
                        "ks": [4],
                        "neighbours": 2,
                        "handoff": True,  # method §5.4-5.5 on the pipeline dictionary's top set
                        "handoff_alphas": [0, 1],
                    },
                }
            },
        )
        assert r.status_code == 201, r.text
        job = finished_job(c, r.json()["id"])
        assert job["status"] == "succeeded", c.get(f"/jobs/{job['id']}/logs").json()
        effects = c.get(f"/jobs/{job['id']}/results/feature_effects", params={"limit": 5000}).json()["data"]
        share = next(e for e in effects if e["intervention"] == "ablate_topk" and e["statistic"] == "share")
        assert share["effect"] >= 0.5
        handoff = c.get(f"/jobs/{job['id']}/results/handoff", params={"limit": 5000}).json()["data"]
        upstream = c.get("/features/upstream", params={"dictionary_id": d["id"], "limit": 4}).json()["data"]
        r = c.post(
            "/jobs", json={"spec": {"kind": "load_dictionary", "pair_id": ORGANISM, "path": d["path"]}}
        )
        assert r.status_code == 201, r.text
        assert finished_job(c, r.json()["id"])["status"] == "succeeded"
        outside = c.post(
            "/jobs", json={"spec": {"kind": "load_dictionary", "pair_id": ORGANISM, "path": "/etc"}}
        )
        assert outside.status_code == 422
    # the handoff through the service: the SAE's top set carries the upstream-dependent effect, IT's block 0
    # (the early window writes u) hands it off through them, and they fire more under IT upstream
    pair_rows = {
        (r["analysis"], r["window_name"], r["alpha"], r["set_kind"], r["statistic"]): r
        for r in handoff
        if r["level"] == "pair"
    }
    assert pair_rows[("gate", None, None, "topk", "gate")]["effect"] > 5.0
    assert pair_rows[("dose", None, 0.0, "topk", "alpha0_max_abs_diff")]["effect"] == 0.0
    assert pair_rows[("dose", None, 1.0, "topk", "rescue_fraction")]["effect"] > 0.5
    assert pair_rows[("rescue_graft", "early", None, "topk", "mediated_fraction")]["effect"] > 0.5
    assert {r["level"] for r in handoff} == {"pair", "family", "balanced"}
    assert len(upstream) == 4 and upstream[0]["diff"] > 0.5 and upstream[0]["split"] == "test"
