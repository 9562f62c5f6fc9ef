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
