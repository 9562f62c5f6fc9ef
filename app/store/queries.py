"""The fixed, parameterised results queries (no user-written SQL ever reaches DuckDB).

Each function takes a DuckDB cursor and returns an Arrow table, so the service (through its one
connection) and a laptop user (opening the file directly when no server runs) share one implementation.

- `top_features`: top mediating features by family, from per-feature attribution scores
  (`feature_effects.intervention = 'attribution'`), averaged over jobs weighted by their events.
- `feature_across_events`: one latent's activations across events, with the prompts' text.
- `ablation_curve`: effect of ablating the top-k set (and controls) as a curve over k.
- `compare_families`: per family, the baseline interaction and the top-k ablation share at each k.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa


def _run(cur: duckdb.DuckDBPyConnection, sql: str, params: list) -> pa.Table:
    return cur.sql(sql, params=params).to_arrow_table()


def top_features(
    cur: duckdb.DuckDBPyConnection,
    family: str | None = None,
    dictionary_id: str | None = None,
    layer: int | None = None,
    min_events: int = 0,
    intervention: str = "attribution",
    limit: int = 50,
) -> pa.Table:
    """Features ranked by their event-weighted mean effect (attribution score by default).

    Attribution scores come from `feature_scores`, which ingest keeps aggregated over jobs (a top-N scan);
    other per-feature interventions are aggregated here.
    """
    if intervention == "attribution":
        sql = """
            SELECT family, dictionary_id, layer, latent, score, n_events, n_jobs
            FROM feature_scores
            WHERE (? IS NULL OR family = ?) AND (? IS NULL OR dictionary_id = ?) AND (? IS NULL OR layer = ?)
              AND n_events >= ?
            ORDER BY score DESC, family, dictionary_id, latent
            LIMIT ?
        """
        return _run(cur, sql, [family, family, dictionary_id, dictionary_id, layer, layer, min_events, limit])
    sql = """
        SELECT family, dictionary_id, layer, latent,
               sum(effect * n) / sum(n) AS score,
               sum(n) AS n_events,
               count(DISTINCT job_id) AS n_jobs
        FROM feature_effects
        WHERE latent IS NOT NULL AND intervention = ?
          AND (? IS NULL OR family = ?)
          AND (? IS NULL OR dictionary_id = ?)
          AND (? IS NULL OR layer = ?)
        GROUP BY family, dictionary_id, layer, latent
        HAVING sum(n) >= ?
        ORDER BY score DESC, family, dictionary_id, latent
        LIMIT ?
    """
    params = [intervention, family, family, dictionary_id, dictionary_id, layer, layer, min_events, limit]
    return _run(cur, sql, params)


def feature_across_events(
    cur: duckdb.DuckDBPyConnection,
    dictionary_id: str,
    latent: int,
    family: str | None = None,
    limit: int = 100,
) -> pa.Table:
    """One latent across events: PT-up / IT-up activation, attribution, and the event's text."""
    sql = """
        SELECT a.job_id, a.family, a.pair_id, a.prompt_id, a.layer, a.split,
               a.act_ptup, a.act_itup, a.act_itup - a.act_ptup AS act_delta, a.attribution,
               e.position, e.prompt_text, e.prefix_text, e.t_pt_text, e.t_it_text
        FROM feature_acts a
        LEFT JOIN events e ON e.job_id = a.job_id AND e.prompt_id = a.prompt_id
        WHERE a.dictionary_id = ? AND a.latent = ? AND (? IS NULL OR a.family = ?)
        ORDER BY abs(a.act_itup - a.act_ptup) DESC, a.prompt_id
        LIMIT ?
    """
    return _run(cur, sql, [dictionary_id, latent, family, family, limit])


def ablation_curve(
    cur: duckdb.DuckDBPyConnection,
    family: str | None = None,
    statistic: str = "share",
    job_id: str | None = None,
) -> pa.Table:
    """Set-level ablation / rescue effects over k (top-k and controls), per family and dictionary set."""
    sql = """
        SELECT job_id, family, dictionary_id, intervention, k, statistic, effect, ci_low, ci_high, n
        FROM feature_effects
        WHERE latent IS NULL AND (intervention LIKE 'ablate_%' OR intervention LIKE 'rescue_%')
          AND statistic = ? AND (? IS NULL OR family = ?) AND (? IS NULL OR job_id = ?)
        ORDER BY family, dictionary_id, intervention, k
    """
    return _run(cur, sql, [statistic, family, family, job_id, job_id])


def compare_families(cur: duckdb.DuckDBPyConnection, readout: str = "it", subset: str = "all") -> pa.Table:
    """Per family (latest job): interaction with CI from the 2x2 summaries, and top-k ablation shares."""
    sql = """
        WITH inter AS (
            SELECT family, arg_max(estimate, job_id) AS interaction, arg_max(ci_low, job_id) AS ci_low,
                   arg_max(ci_high, job_id) AS ci_high, arg_max(n, job_id) AS n
            FROM summaries
            WHERE statistic = 'interaction' AND readout = ? AND subset = ?
              -- family rows at the headline boundaries (rows ingested before levels existed: level 'pair')
              AND ((level = 'family' AND headline) OR (level = 'pair' AND headline IS NULL))
            GROUP BY family
        ), shares AS (
            SELECT family, k, avg(effect) AS topk_share
            FROM feature_effects
            WHERE intervention = 'ablate_topk' AND statistic = 'share' AND latent IS NULL
            GROUP BY family, k
        )
        SELECT i.family, i.interaction, i.ci_low, i.ci_high, i.n, s.k, s.topk_share
        FROM inter i LEFT JOIN shares s USING (family)
        ORDER BY i.family, s.k
    """
    return _run(cur, sql, [readout, subset])


QUERIES = {
    "top_features": top_features,
    "feature_across_events": feature_across_events,
    "ablation_curve": ablation_curve,
    "compare_families": compare_families,
}
