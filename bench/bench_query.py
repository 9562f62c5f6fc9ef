"""Top-features query latency over 10 million feature-effect rows (target: p50 < 100 ms on this machine).

    python bench/bench_query.py --rows 10000000

Builds a DuckDB file with the service's own DDL, fills `feature_effects` with per-feature attribution
rows (families x dictionaries x latents x jobs) and `feature_acts` with the same number of activation
rows, then times the service's fixed queries (`app.store.queries`) through `ResultsStore.query`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import machine

from crosspatch.app.store.duckdb import ResultsStore

FAMILIES = ["llama", "qwen3", "mistral", "olmo2", "gemma3"]


def fill(store: ResultsStore, rows: int, tmp: Path, jobs: int = 20) -> None:
    """Synthetic rows in the real schema, ingested job by job through the service's own ingest path:
    5 families x 4 dictionaries x latents, `rows / jobs` feature-effect and feature-act rows per job."""
    import duckdb

    per_job = rows // jobs
    gen = duckdb.connect()
    for j in range(jobs):
        family = FAMILIES[j % len(FAMILIES)]
        effects, acts = tmp / f"effects-{j}.parquet", tmp / f"acts-{j}.parquet"
        gen.execute(
            f"""COPY (SELECT '{family}' AS family, 'pair' AS pair_id, 'dict-' || (i % 4) AS dictionary_id,
                      (29 + i % 3)::INTEGER AS layer, 'attribution' AS intervention, 1::INTEGER AS k,
                      (i // 4)::BIGINT AS latent, 'attribution_score' AS statistic,
                      hash(i + {j}) % 100000 / 100000.0 - 0.3 AS effect, NULL::DOUBLE AS ci_low,
                      NULL::DOUBLE AS ci_high, 160::BIGINT AS n
                FROM range({per_job}) t(i)) TO '{effects}' (FORMAT parquet)"""
        )
        gen.execute(
            f"""COPY (SELECT '{family}' AS family, 'pair' AS pair_id, 'p' || (i % 600) AS prompt_id,
                      'dict-' || (i % 4) AS dictionary_id, (29 + i % 3)::INTEGER AS layer,
                      ((i // 600) % 65536)::BIGINT AS latent, hash(i) % 1000 / 100.0 AS act_ptup,
                      hash(i + 1) % 1000 / 100.0 AS act_itup, NULL::DOUBLE AS attribution, 'test' AS split
                FROM range({per_job}) t(i)) TO '{acts}' (FORMAT parquet)"""
        )
        store.ingest(
            f"job-{j}",
            [("feature_effects", str(effects)), ("feature_acts", str(acts))],
            {"kind": "mediation", "spec": {}, "provenance": {}},
        )
        effects.unlink()
        acts.unlink()


def timed(store: ResultsStore, name: str, repeats: int, **params) -> tuple[float, float, int]:
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = store.query(name, **params).num_rows
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "results.duckdb")
        t0 = time.perf_counter()
        fill(store, args.rows, Path(tmp))
        with store.cursor() as cur:
            n_eff, n_scores = (
                cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("feature_effects", "feature_scores")
            )
        print(
            f"ingested {n_eff:,} feature_effects rows (+ as many feature_acts rows) in 20 jobs in "
            f"{time.perf_counter() - t0:.1f}s; feature_scores holds {n_scores:,} aggregated features"
        )
        cases = [
            ("top_features", dict(family="llama", limit=50)),
            ("top_features", dict(family="llama", dictionary_id="dict-1", min_events=100, limit=50)),
            ("top_features", dict(limit=50)),
            ("feature_across_events", dict(dictionary_id="dict-2", latent=100, limit=100)),
            ("ablation_curve", dict(family="llama")),
        ]
        print(f"\n{'query':<24} {'filters':<58} {'p50 ms':>8} {'p95 ms':>8} {'rows':>6}")
        for name, params in cases:
            timed(store, name, 2, **params)  # warm-up
            p50, p95, n = timed(store, name, args.repeats, **params)
            shown = {k: v for k, v in params.items() if k != "limit"}
            print(f"{name:<24} {shown!s:<58} {1000 * p50:8.1f} {1000 * p95:8.1f} {n:>6}")
        store.close()
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
