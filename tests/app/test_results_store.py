"""The results store: atomic ingest, reruns replace rows, failed ingests leave nothing, derived scores."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosspatch.app.store.duckdb import ResultsError, ResultsStore
from crosspatch.engine.results import FEATURE_EFFECTS_SCHEMA, GATE_CHECKS_SCHEMA, SUMMARY_SCHEMA
from tests.app.builders import effect_row

PROV = {"kind": "mediation", "spec": {}, "provenance": {}}


def _effects(path: Path, family: str, scores: dict[int, float], n: int) -> str:
    rows = [
        effect_row(family=family, k=i + 1, latent=latent, effect=score, n=n)
        for i, (latent, score) in enumerate(scores.items())
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA), path)
    return str(path)


def test_top_features_are_event_weighted_across_jobs_and_follow_reruns_and_deletes(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.duckdb")
    store.ingest(
        "a", [("feature_effects", _effects(tmp_path / "a.parquet", "llama", {1: 1.0, 2: 0.5}, 10))], PROV
    )
    store.ingest(
        "b", [("feature_effects", _effects(tmp_path / "b.parquet", "llama", {1: 0.0, 3: 0.2}, 30))], PROV
    )
    top = store.query("top_features", family="llama", limit=10).to_pylist()
    score = {r["latent"]: (r["score"], r["n_events"], r["n_jobs"]) for r in top}
    assert score[1] == pytest.approx((0.25, 40, 2))  # (1.0 * 10 + 0.0 * 30) / 40
    assert [r["latent"] for r in top] == [2, 1, 3]
    # a rerun of job b replaces its rows: nothing doubles
    store.ingest(
        "b", [("feature_effects", _effects(tmp_path / "b2.parquet", "llama", {1: 0.0, 3: 0.2}, 30))], PROV
    )
    assert store.counts("b")["feature_effects"] == 2
    assert store.query("top_features", family="llama", limit=10).to_pylist() == top
    # deleting job a recomputes the scores from what is left
    store.delete_job("a")
    top = store.query("top_features", family="llama", limit=10).to_pylist()
    assert {r["latent"]: r["score"] for r in top} == {1: 0.0, 3: pytest.approx(0.2)}
    assert store.query("top_features", family="qwen3", limit=10).num_rows == 0
    store.close()


def test_a_failed_ingest_leaves_no_rows(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.duckdb")
    good = _effects(tmp_path / "good.parquet", "llama", {1: 1.0}, 10)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"family": ["llama"]}), bad)  # a part missing most columns
    with pytest.raises(ResultsError):
        store.ingest("j", [("feature_effects", good), ("feature_effects", str(bad))], PROV)
    assert all(v == 0 for v in store.counts("j").values())
    assert store.query("top_features", limit=10).num_rows == 0
    store.close()


def _old_results_file(tmp_path: Path, *statements: str) -> Path:
    """A DuckDB file as an older crosspatch wrote it: `statements` (CREATE / INSERT) run on a fresh file."""
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for sql in statements:
        con.execute(sql)
    con.close()
    return path


def test_a_results_file_with_the_old_summaries_table_is_upgraded_in_place(tmp_path: Path) -> None:
    """A DuckDB file written before summary levels existed opens, keeps its rows, and takes new ones."""

    from crosspatch.engine.stats import summarize
    from tests.engine.test_stats import _cells

    path = _old_results_file(
        tmp_path,
        "CREATE TABLE summaries (job_id VARCHAR NOT NULL, family VARCHAR, pair_id VARCHAR, boundary INTEGER, "
        "readout VARCHAR, subset VARCHAR, statistic VARCHAR, estimate DOUBLE, ci_low DOUBLE, ci_high DOUBLE, "
        "n BIGINT, p_value DOUBLE)",
        "INSERT INTO summaries VALUES ('old', 'llama', 'p', 3, 'it', 'all', 'interaction', 1.5, 1.0, 2.0, 9, 0.01),"
        " ('old', '__mean__', '__mean__', -1, 'it', 'all', 'interaction', 1.2, 0.9, 1.5, 18, NULL)",
    )
    store = ResultsStore(path)
    assert [(r["family"], r["interaction"]) for r in store.query("compare_families").to_pylist()] == [
        ("llama", 1.5)
    ]
    old = store.job_table("summaries", "old", limit=10).to_pylist()
    assert [(r["level"], r["family"], r["pair_id"], r["estimate"]) for r in old] == [
        ("balanced", None, None, 1.2),
        ("pair", "llama", "p", 1.5),
    ]
    part = tmp_path / "summaries.parquet"
    new = summarize(
        pa.concat_tables(
            [_cells("llama", [1.0, 2.0, 3.0], [0, 1, 2]), _cells("qwen3", [2.0, 2.0, 2.0], [0, 0, 0])]
        ),
        n_resamples=100,
        n_permutations=99,
    )
    pq.write_table(new, part)
    assert store.ingest("p-new", [("summaries", str(part))], PROV)["summaries"] == new.num_rows
    fam = store.query("compare_families").to_pylist()
    # one row per family x pair x boundary: the old file's pair keeps its row beside the new pairs
    assert {(r["family"], r["pair_id"], r["interaction"]) for r in fam} == {
        ("llama", "p", 1.5),
        *((r["family"], r["pair_id"], 2.0) for r in new.to_pylist() if r["level"] == "pair"),
    }
    store.close()


def _row(dictionary_id: str, intervention: str, latent: int | None, effect: float, n: int, **kw) -> dict:
    statistic = "attribution_score" if intervention == "attribution" else "interaction_drop"
    fields = {"statistic": statistic, **kw}
    return effect_row(
        dictionary_id=dictionary_id, intervention=intervention, latent=latent, effect=effect, n=n, **fields
    )


def _check(dictionary_id: str, name: str, passed: bool) -> dict:
    return dict(
        family="llama",
        pair_id="p",
        dictionary_id=dictionary_id,
        check_name=name,
        value=0.5 if passed else 0.3,
        threshold=0.05,
        passed=passed,
        detail="",
    )


def _mediation_job(
    store: ResultsStore, tmp_path: Path, job: str, effects: list[dict], checks: list[dict]
) -> None:
    e, c = tmp_path / f"{job}-e.parquet", tmp_path / f"{job}-c.parquet"
    pq.write_table(pa.Table.from_pylist(effects, schema=FEATURE_EFFECTS_SCHEMA), e)
    pq.write_table(pa.Table.from_pylist(checks, schema=GATE_CHECKS_SCHEMA), c)
    store.ingest(job, [("feature_effects", str(e)), ("gate_checks", str(c))], PROV)


def _evidence_store(tmp_path: Path) -> ResultsStore:
    """Two jobs on dictionary 'good' (gate passed), one on 'bad' (matched_random_drop failed)."""
    store = ResultsStore(tmp_path / "r.duckdb")
    passed = [_check("good", "topk_causal_drop", True), _check("good", "matched_random_drop", True)]
    jobs = {
        "a": (
            [
                _row("good", "attribution", 1, 1.0, 10),
                _row("good", "attribution", 2, 0.5, 10),
                _row("good", "ablate_single", 1, 0.8, 20, ci_low=0.6, ci_high=1.0),
            ],
            passed,
        ),
        "b": (
            [
                _row("good", "attribution", 1, 0.0, 30),
                _row("good", "ablate_single", 1, 0.4, 60, ci_low=0.2, ci_high=0.6),
            ],
            passed,
        ),
        "c": (
            [
                _row("bad", "attribution", 7, 5.0, 10),
                _row("bad", "ablate_single", 7, 0.1, 20, ci_low=-0.1, ci_high=0.3),
            ],
            [_check("bad", "topk_causal_drop", True), _check("bad", "matched_random_drop", False)],
        ),
    }
    for job, (effects, checks) in jobs.items():
        _mediation_job(store, tmp_path, job, effects, checks)
    return store


def test_top_features_carry_held_out_evidence_and_leave_out_failed_gates(tmp_path: Path) -> None:
    store = _evidence_store(tmp_path)
    top = store.query("top_features", family="llama", limit=10).to_pylist()
    assert [(r["dictionary_id"], r["latent"]) for r in top] == [("good", 2), ("good", 1)]  # 'bad' left out
    one = top[1]
    assert one["score"] == pytest.approx(0.25) and one["n_events"] == 40  # (1.0 x 10 + 0.0 x 30) / 40
    # held-out drop: event-weighted mean (0.8 x 20 + 0.4 x 60) / 80 = 0.5; two jobs -> normal approximation
    # with se_j = 0.4 / 3.92 each and SE = sqrt((20 se)^2 + (60 se)^2) / 80
    se = 0.4 / (2 * 1.959963984540054) * (20**2 + 60**2) ** 0.5 / 80
    assert one["heldout_drop"] == pytest.approx(0.5) and one["heldout_n"] == 80
    assert one["heldout_ci_low"] == pytest.approx(0.5 - 1.959963984540054 * se)
    assert one["heldout_ci_high"] == pytest.approx(0.5 + 1.959963984540054 * se)
    assert one["gate_status"] == "passed" and one["failed_checks"] is None
    assert top[0]["heldout_drop"] is None and top[0]["heldout_n"] is None  # never ablated alone
    everything = store.query("top_features", family="llama", limit=10, include_failed_gate=True).to_pylist()
    bad = everything[0]
    assert (bad["dictionary_id"], bad["latent"], bad["score"]) == ("bad", 7, 5.0)
    # one job: its own percentile CI, untouched
    assert (bad["heldout_drop"], bad["heldout_ci_low"], bad["heldout_ci_high"], bad["heldout_n"]) == (
        0.1,
        -0.1,
        0.3,
        20,
    )
    assert bad["gate_status"] == "failed" and bad["failed_checks"] == "matched_random_drop"
    # per-feature held-out drops ranked directly, with the same gate filter
    held = store.query("top_features", intervention="ablate_single", limit=10).to_pylist()
    assert [(r["dictionary_id"], r["latent"]) for r in held] == [("good", 1)]
    assert held[0]["score"] == pytest.approx(0.5)
    # a rerun of the failing job that now passes brings the dictionary back
    _mediation_job(
        store,
        tmp_path,
        "c",
        [_row("bad", "attribution", 7, 5.0, 10)],
        [_check("bad", "topk_causal_drop", True), _check("bad", "matched_random_drop", True)],
    )
    assert store.query("top_features", limit=1).to_pylist()[0]["gate_status"] == "passed"
    store.close()


def test_an_older_feature_scores_table_is_rebuilt_on_open(tmp_path: Path) -> None:
    import duckdb

    from crosspatch.app.store.result_tables import ddl

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(ddl("feature_effects"))
    con.execute(
        "CREATE TABLE feature_scores (family VARCHAR NOT NULL, dictionary_id VARCHAR NOT NULL, layer INTEGER, "
        "latent BIGINT NOT NULL, score DOUBLE, n_events BIGINT, n_jobs BIGINT)"
    )
    con.execute(
        "INSERT INTO feature_effects VALUES ('j', 'llama', 'p', 'd', 3, 'attribution', 1, 5, 'attribution_score', "
        "2.0, NULL, NULL, 10)"
    )
    con.close()
    store = ResultsStore(path)
    (row,) = store.query("top_features", limit=5).to_pylist()
    assert (row["latent"], row["score"], row["n_events"], row["heldout_drop"], row["gate_status"]) == (
        5,
        2.0,
        10,
        None,
        "unknown",
    )
    store.close()


def _summary(pair_id: str, boundary: int, estimate: float, headline: bool = True) -> dict:
    return dict(
        level="pair",
        headline=headline,
        family="llama",
        pair_id=pair_id,
        boundary=boundary,
        readout="it",
        subset="all",
        statistic="interaction",
        estimate=estimate,
        ci_low=estimate - 1,
        ci_high=estimate + 1,
        n=10,
        p_value=0.01,
    )


def test_compare_families_filters_by_boundary_pair_and_readout(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.duckdb")
    s = tmp_path / "s.parquet"
    rows = [_summary("p", 1, 1.0, headline=False), _summary("p", 3, 2.0), _summary("q", 3, 4.0)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), s)
    e = tmp_path / "e.parquet"
    share = _row("d", "ablate_topk", None, 0.4, 10, statistic="share", k=20)
    pq.write_table(pa.Table.from_pylist([share], schema=FEATURE_EFFECTS_SCHEMA), e)
    store.ingest("j", [("summaries", str(s)), ("feature_effects", str(e))], PROV)
    got = store.query("compare_families", boundary=3).to_pylist()
    assert [(r["pair_id"], r["boundary"], r["interaction"], r["k"], r["topk_share"]) for r in got] == [
        ("p", 3, 2.0, 20, 0.4),
        ("q", 3, 4.0, None, None),
    ]
    got = store.query("compare_families", pair_id="p").to_pylist()  # no boundary: the pair's headline
    assert [(r["boundary"], r["interaction"]) for r in got] == [(3, 2.0)]
    got = store.query("compare_families", pair_id="p", boundary=1).to_pylist()
    assert [(r["boundary"], r["interaction"]) for r in got] == [(1, 1.0)]
    assert store.query("compare_families", readout="pt").num_rows == 0
    store.close()


def test_top_features_endpoint_serves_the_evidence_and_the_gate_flag(tmp_path: Path, settings) -> None:
    """The HTTP route over a real DuckDB file: failed-gate dictionaries only with include_failed_gate=true."""
    from tests.app.live import client, live_service

    assert settings.duckdb_path is not None
    tmp = tmp_path / "parts"
    tmp.mkdir()
    _evidence_store(tmp).close()
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "r.duckdb").rename(settings.duckdb_path)
    with (
        live_service(settings, {"ada": "researcher"}, {}) as (server, keys),
        client(server, keys["ada"]) as c,
    ):
        r = c.get("/features/top", params={"family": "llama"})
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        assert [(x["dictionary_id"], x["latent"], x["gate_status"]) for x in rows] == [
            ("good", 2, "passed"),
            ("good", 1, "passed"),
        ]
        assert rows[1]["heldout_drop"] == pytest.approx(0.5) and rows[1]["heldout_n"] == 80
        rows = c.get("/features/top", params={"include_failed_gate": "true"}).json()["data"]
        assert (rows[0]["dictionary_id"], rows[0]["gate_status"], rows[0]["heldout_ci_low"]) == (
            "bad",
            "failed",
            -0.1,
        )
        fam = c.get("/features/families", params={"boundary": 3, "pair_id": "p"})
        assert fam.status_code == 200 and fam.json()["data"] == []
        assert c.get("/features/curve", params={"statistic": "gate"}).status_code == 422


def test_events_written_before_event_kinds_read_as_first_diff(tmp_path: Path) -> None:
    """An events table without the `event` column gains it; its old rows were headline first divergences."""

    path = _old_results_file(
        tmp_path,
        "CREATE TABLE events (job_id VARCHAR NOT NULL, family VARCHAR, pair_id VARCHAR, prompt_id VARCHAR)",
        "INSERT INTO events VALUES ('old', 'llama', 'p', 'q1')",
    )
    store = ResultsStore(path)
    (row,) = store.job_table("events", "old", limit=10).to_pylist()
    assert row["prompt_id"] == "q1" and row["event"] == "first_diff" and row["diverged"] is None
