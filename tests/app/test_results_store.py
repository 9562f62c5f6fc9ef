"""The results store: atomic ingest, reruns replace rows, failed ingests leave nothing, derived scores."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosspatch.app.store.duckdb import ResultsError, ResultsStore
from crosspatch.engine.results import FEATURE_EFFECTS_SCHEMA

PROV = {"kind": "mediation", "spec": {}, "provenance": {}}


def _effects(path: Path, family: str, scores: dict[int, float], n: int) -> str:
    rows = [
        dict(
            family=family,
            pair_id="p",
            dictionary_id="d",
            layer=3,
            intervention="attribution",
            k=i + 1,
            latent=latent,
            statistic="attribution_score",
            effect=score,
            ci_low=None,
            ci_high=None,
            n=n,
        )
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


def test_a_results_file_with_the_old_summaries_table_is_upgraded_in_place(tmp_path: Path) -> None:
    """A DuckDB file written before summary levels existed opens, keeps its rows, and takes new ones."""
    import duckdb

    from crosspatch.engine.stats import summarize
    from tests.engine.test_stats import _cells

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE summaries (job_id VARCHAR NOT NULL, family VARCHAR, pair_id VARCHAR, boundary INTEGER, "
        "readout VARCHAR, subset VARCHAR, statistic VARCHAR, estimate DOUBLE, ci_low DOUBLE, ci_high DOUBLE, "
        "n BIGINT, p_value DOUBLE)"
    )
    con.execute(
        "INSERT INTO summaries VALUES ('old', 'llama', 'p', 3, 'it', 'all', 'interaction', 1.5, 1.0, 2.0, 9, 0.01),"
        " ('old', '__mean__', '__mean__', -1, 'it', 'all', 'interaction', 1.2, 0.9, 1.5, 18, NULL)"
    )
    con.close()

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
    assert {(r["family"], r["interaction"]) for r in fam} == {("llama", 2.0), ("qwen3", 2.0)}  # latest job
    store.close()
