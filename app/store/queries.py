"""The fixed, parameterised results queries (no user-written SQL ever reaches DuckDB).

Each function takes a DuckDB cursor and returns an Arrow table, so the service (through its one
connection) and a laptop user (opening the file directly when no server runs) share one implementation.

- `top_features`: top mediating features by family, from per-feature attribution scores
  (`feature_effects.intervention = 'attribution'`), averaged over jobs weighted by their events, with the
  held-out single-feature ablation drop (CI, n) and the dictionary's gate status (failed gates left out
  unless asked).
- `feature_across_events`: one latent's activations across events, with the prompts' text.
- `ablation_curve`: effect of ablating the top-k set (and controls) as a curve over k.
- `compare_families`: per family, pair and boundary, the interaction and the top-k ablation share at each k.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa


def _run(cur: duckdb.DuckDBPyConnection, sql: str, params: list) -> pa.Table:
    return cur.sql(sql, params=params).to_arrow_table()


# Per dictionary: 'passed' when every gate check any job recorded for it passed, 'failed' when one did not,
# 'unknown' when no job recorded any (a small GROUP BY over gate_checks, joined to the top-N scan).
_GATE = """
    gate AS (
        SELECT dictionary_id, bool_and(passed) AS ok,
               string_agg(DISTINCT CASE WHEN NOT passed THEN check_name END, ',') AS failed_checks
        FROM gate_checks GROUP BY dictionary_id
    )
"""
_GATE_STATUS = "CASE WHEN g.ok IS NULL THEN 'unknown' WHEN g.ok THEN 'passed' ELSE 'failed' END"


def top_features(
    cur: duckdb.DuckDBPyConnection,
    family: str | None = None,
    dictionary_id: str | None = None,
    layer: int | None = None,
    min_events: int = 0,
    intervention: str = "attribution",
    limit: int = 50,
    include_failed_gate: bool = False,
) -> pa.Table:
    """Features ranked by fit-split attribution, with their causal evidence and their dictionary's gate.

    Per feature: `score` (event-weighted mean attribution, fit split), `n_events`, `n_jobs`, the held-out
    single-feature ablation drop `heldout_drop` [`heldout_ci_low`, `heldout_ci_high`] over `heldout_n`
    test events (null when the feature was not ablated alone), and `gate_status` of its dictionary.
    Dictionaries whose gate failed are left out unless `include_failed_gate`. Attribution rows come from
    `feature_scores`, which ingest keeps aggregated over jobs (a top-N scan); other per-feature
    interventions (e.g. `ablate_single`) are aggregated here.
    """
    if intervention == "attribution":
        sql = f"""
            WITH {_GATE}
            SELECT s.family, s.dictionary_id, s.layer, s.latent, s.score, s.n_events, s.n_jobs,
                   s.heldout_drop, s.heldout_ci_low, s.heldout_ci_high, s.heldout_n,
                   {_GATE_STATUS} AS gate_status, g.failed_checks
            FROM feature_scores s LEFT JOIN gate g USING (dictionary_id)
            WHERE (? IS NULL OR s.family = ?) AND (? IS NULL OR s.dictionary_id = ?) AND (? IS NULL OR s.layer = ?)
              AND s.n_events >= ? AND (? OR g.ok IS DISTINCT FROM false)
            ORDER BY s.score DESC, s.family, s.dictionary_id, s.latent
            LIMIT ?
        """
        params = [family, family, dictionary_id, dictionary_id, layer, layer, min_events]
        return _run(cur, sql, [*params, include_failed_gate, limit])
    sql = f"""
        WITH {_GATE}, agg AS (
            SELECT family, dictionary_id, layer, latent,
                   sum(effect * n) / sum(n) AS score,
                   sum(n) AS n_events,
                   count(DISTINCT job_id) AS n_jobs
            FROM feature_effects
            WHERE latent IS NOT NULL AND intervention = ? AND n > 0
              AND (? IS NULL OR family = ?)
              AND (? IS NULL OR dictionary_id = ?)
              AND (? IS NULL OR layer = ?)
            GROUP BY family, dictionary_id, layer, latent
            HAVING sum(n) >= ?
        )
        SELECT a.*, {_GATE_STATUS} AS gate_status, g.failed_checks
        FROM agg a LEFT JOIN gate g USING (dictionary_id)
        WHERE (? OR g.ok IS DISTINCT FROM false)
        ORDER BY a.score DESC, a.family, a.dictionary_id, a.latent
        LIMIT ?
    """
    params = [intervention, family, family, dictionary_id, dictionary_id, layer, layer, min_events]
    return _run(cur, sql, [*params, include_failed_gate, limit])


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


def compare_families(
    cur: duckdb.DuckDBPyConnection,
    readout: str = "it",
    subset: str = "all",
    boundary: int | None = None,
    pair_id: str | None = None,
) -> pa.Table:
    """Per family, pair and boundary (latest job): interaction with CI, and the pair's top-k ablation shares.

    Filters: `readout`, `subset`, `boundary` (default: each pair's headline boundary), `pair_id`. Mediation measures on the common-IT readout at one
    boundary per pair (recorded in the job's provenance), so shares join only to `readout = 'it'` rows; a
    share is null where the interaction CI of its own test split covered 0.
    """
    sql = """
        WITH inter AS (
            SELECT family, pair_id, boundary, arg_max(estimate, job_id) AS interaction,
                   arg_max(ci_low, job_id) AS ci_low, arg_max(ci_high, job_id) AS ci_high, arg_max(n, job_id) AS n
            FROM summaries
            WHERE statistic = 'interaction' AND readout = ? AND subset = ? AND level = 'pair'
              -- a named boundary, else each pair's headline (rows ingested before headlines existed: NULL)
              AND (CASE WHEN ? IS NULL THEN (headline OR headline IS NULL) ELSE boundary = ? END)
              AND (? IS NULL OR pair_id = ?)
            GROUP BY family, pair_id, boundary
        ), shares AS (
            SELECT family, pair_id, k, avg(effect) AS topk_share
            FROM feature_effects
            WHERE intervention = 'ablate_topk' AND statistic = 'share' AND latent IS NULL
              AND (? IS NULL OR pair_id = ?)
            GROUP BY family, pair_id, k
        )
        SELECT i.family, i.pair_id, i.boundary, i.interaction, i.ci_low, i.ci_high, i.n, s.k, s.topk_share
        FROM inter i LEFT JOIN shares s ON s.family = i.family AND s.pair_id = i.pair_id AND ? = 'it'
        ORDER BY i.family, i.pair_id, i.boundary, s.k
    """
    return _run(cur, sql, [readout, subset, boundary, boundary, pair_id, pair_id, pair_id, pair_id, readout])


def feature_upstream(
    cur: duckdb.DuckDBPyConnection,
    family: str | None = None,
    dictionary_id: str | None = None,
    pair_id: str | None = None,
    split: str = "test",
    limit: int = 100,
) -> pa.Table:
    """Latents driven by upstream state: mean activation IT-up vs PT-up in the IT late stack, paired diff (CI)."""
    sql = """
        SELECT job_id, family, pair_id, dictionary_id, layer, latent, split,
               mean_act_itup, mean_act_ptup, diff, ci_low, ci_high, n
        FROM feature_upstream
        WHERE split = ? AND (? IS NULL OR family = ?) AND (? IS NULL OR dictionary_id = ?)
          AND (? IS NULL OR pair_id = ?)
        ORDER BY diff DESC, dictionary_id, latent, job_id
        LIMIT ?
    """
    return _run(cur, sql, [split, family, family, dictionary_id, dictionary_id, pair_id, pair_id, limit])


QUERIES = {
    "feature_upstream": feature_upstream,
    "top_features": top_features,
    "feature_across_events": feature_across_events,
    "ablation_curve": ablation_curve,
    "compare_families": compare_families,
}
