"""The results tables in DuckDB, in one place: Arrow schemas, DDL, and keys.

Every table carries `job_id` (the ingest key: a rerun replaces a job's rows). The engine's own result
schemas (`engine.results`) define every part table; this module adds `job_id`, provenance and DDL.

    events           one row per prompt: divergence position, tokens, texts (engine.results.EVENTS_SCHEMA)
    cells            one row per event x boundary x readout: the 2x2 and its effects (CELLS_SCHEMA)
    summaries        one row per level (pair/family/balanced) x pair-or-family x boundary-or-depth x readout
                     x subset x statistic: estimate, CI, n, p, Holm p, sweep-wide p (engine.stats.summarize)
    feature_acts     one row per event x dictionary x latent: activation under PT-up / IT-up, attribution
    feature_effects  one row per family x dictionary x latent-or-set x intervention x k: effect with CI
    feature_examples one row per latent x top-activating event: the scored token decoded in its context
    feature_decoder_tokens  one row per latent x top/bottom x rank: decoder row's logit-lens tokens
    gate_checks      one row per dictionary x quality-gate check a job measured: value, threshold, passed
    handoff          one row per level x analysis (gate, dose, grafts) x window-or-alpha x set x statistic
    feature_upstream one row per pair x dictionary x latent x split: mean act IT-up vs PT-up, paired diff (CI)
    forced_tokens    one row per event x forced branch: forced token, IT continuation text, validator, success
                     (engine.forced.FORCED_SCHEMA)
    forced_summaries one row per level x category x statistic x view: it - pt success contrast, success rates
    continuation     one row per event x variant x N: C_N and tail-only C_N per cell, interaction, candidates
                     (engine.continuation.CONTINUATION_SCHEMA)
    continuation_summaries  one row per pair x variant x N x statistic: mean, CI, n events
    lora_controls    one row per domain-training control: status, failed checks, NLL gate, merge diff, interaction
    provenance       one row per job: kind, spec, models' revisions, tokenizer hash, versions, device

The controls of the 2x2 (crosspatch / pipeline jobs with `controls`, the `lineage` job; engine.control_suite):
    interpolation    one row per event x alpha: PT->IT interpolated upstream through both late stacks
    signperm         one row per event x seed: the signed-permutation random interaction (engine.offmanifold)
    offmanifold      one row per pair x statistic: slope (CI), curve C(a), signed-permutation ratio (CI)
    boundary_margins one row per event: IT's boundary logit-lens margin (engine.commitment)
    commitment       one row per pair x view: all / uncommitted / committed / margin bins / intercept
    baseline_cells   one row per scored event x condition: the 2x2 (first divergence, random rollout
                     disagreements, pre-divergence prefix, native histories; engine.baselines)
    baselines        one row per pair x condition: interaction (CI), share of first divergence (CI)
    lineage_cells    one row per stage x event: the 2x2 of each stage as IT against the base (engine.recipe)
    lineage          one row per stage: interaction (CI, p), late effects, portable share, share of reference
    recipe_contrasts one row per (stage_a, stage_b): interaction A - B (CI) with the sign-flip p
    anatomy_events   one row per event x measure: final-k interactions, final-MLP margin, MLP support (engine.anatomy)
    anatomy          one row per pair x statistic: means (CI), final-k retention, valid / reason
    identity_transfer_events  one row per event x host x window: grafted top-1, transferred, margin gain
                     (engine.identity_transfer)
    identity_transfer one row per pair x host x window x statistic: transfer rate, margin gain (CI), valid
    source_decomposition_events  one row per event x source: interaction with only that source's difference
                     (engine.source_decomposition)
    source_decomposition  one row per pair x source x statistic: interaction, share, non-additivity (CI)
    closure_cells    one row per boundary x held-out event x arm x rank x alpha: injected, floor and native Y
                     (engine.closure)
    closure          one row per pair x boundary x arm x rank x alpha: closure (CI), valid / reason
"""

from __future__ import annotations

import pyarrow as pa

from crosspatch.engine.control_schemas import (
    ANATOMY_EVENTS_SCHEMA,
    ANATOMY_SCHEMA,
    BASELINE_CELLS_SCHEMA,
    BASELINE_SUMMARY_SCHEMA,
    BOUNDARY_MARGIN_SCHEMA,
    CLOSURE_CELLS_SCHEMA,
    CLOSURE_SCHEMA,
    COMMITMENT_SCHEMA,
    IDENTITY_TRANSFER_EVENTS_SCHEMA,
    IDENTITY_TRANSFER_SCHEMA,
    INTERPOLATION_SCHEMA,
    LINEAGE_CELLS_SCHEMA,
    LINEAGE_SCHEMA,
    OFFMANIFOLD_SUMMARY_SCHEMA,
    RECIPE_CONTRAST_SCHEMA,
    SIGNPERM_SCHEMA,
    SOURCE_DECOMPOSITION_EVENTS_SCHEMA,
    SOURCE_DECOMPOSITION_SCHEMA,
)
from crosspatch.engine.results import (
    CELLS_SCHEMA,
    CONTINUATION_SCHEMA,
    CONTINUATION_SUMMARY_SCHEMA,
    EVENTS_SCHEMA,
    FEATURE_ACTS_SCHEMA,
    FEATURE_DECODER_TOKENS_SCHEMA,
    FEATURE_EFFECTS_SCHEMA,
    FEATURE_EXAMPLES_SCHEMA,
    FEATURE_UPSTREAM_SCHEMA,
    FORCED_SCHEMA,
    FORCED_SUMMARY_SCHEMA,
    GATE_CHECKS_SCHEMA,
    HANDOFF_SCHEMA,
    LORA_CONTROL_SCHEMA,
    SUMMARY_SCHEMA,
)

PROVENANCE_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("spec", pa.string()),  # JSON
        ("provenance", pa.string()),  # JSON
    ]
)

# Table name -> schema of the rows a worker writes (job_id is added at ingest).
PART_SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "cells": CELLS_SCHEMA,
    "summaries": SUMMARY_SCHEMA,
    "feature_acts": FEATURE_ACTS_SCHEMA,
    "feature_effects": FEATURE_EFFECTS_SCHEMA,
    "feature_examples": FEATURE_EXAMPLES_SCHEMA,
    "feature_decoder_tokens": FEATURE_DECODER_TOKENS_SCHEMA,
    "gate_checks": GATE_CHECKS_SCHEMA,
    "handoff": HANDOFF_SCHEMA,  # engine.handoff (mediation / pipeline jobs with `handoff`)
    "feature_upstream": FEATURE_UPSTREAM_SCHEMA,
    "forced_tokens": FORCED_SCHEMA,
    "forced_summaries": FORCED_SUMMARY_SCHEMA,
    "continuation": CONTINUATION_SCHEMA,
    "continuation_summaries": CONTINUATION_SUMMARY_SCHEMA,
    "lora_controls": LORA_CONTROL_SCHEMA,
    # controls of the 2x2
    "interpolation": INTERPOLATION_SCHEMA,
    "signperm": SIGNPERM_SCHEMA,
    "offmanifold": OFFMANIFOLD_SUMMARY_SCHEMA,
    "boundary_margins": BOUNDARY_MARGIN_SCHEMA,
    "commitment": COMMITMENT_SCHEMA,
    "baseline_cells": BASELINE_CELLS_SCHEMA,
    "baselines": BASELINE_SUMMARY_SCHEMA,
    "lineage_cells": LINEAGE_CELLS_SCHEMA,
    "lineage": LINEAGE_SCHEMA,
    "recipe_contrasts": RECIPE_CONTRAST_SCHEMA,
    "anatomy_events": ANATOMY_EVENTS_SCHEMA,
    "anatomy": ANATOMY_SCHEMA,
    "identity_transfer_events": IDENTITY_TRANSFER_EVENTS_SCHEMA,
    "identity_transfer": IDENTITY_TRANSFER_SCHEMA,
    "source_decomposition_events": SOURCE_DECOMPOSITION_EVENTS_SCHEMA,
    "source_decomposition": SOURCE_DECOMPOSITION_SCHEMA,
    "closure_cells": CLOSURE_CELLS_SCHEMA,
    "closure": CLOSURE_SCHEMA,
}
TABLES: dict[str, pa.Schema] = {**PART_SCHEMAS, "provenance": PROVENANCE_SCHEMA}

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def duck_type(t: pa.DataType) -> str:
    """DuckDB type of an Arrow type used in these schemas."""
    if pa.types.is_list(t):
        return f"{duck_type(t.value_type)}[]"
    if t not in _DUCK_TYPES:
        raise TypeError(f"no DuckDB type for Arrow {t}")
    return _DUCK_TYPES[t]


def ddl(table: str) -> str:
    """CREATE TABLE IF NOT EXISTS for `table` (job_id first)."""
    cols = ", ".join(f"{f.name} {duck_type(f.type)}" for f in TABLES[table])
    return f"CREATE TABLE IF NOT EXISTS {table} (job_id VARCHAR NOT NULL, {cols})"


# Rows ingested before a column existed: what the new columns mean for them (after ADD COLUMN).
_BACKFILL = {
    "summaries": [
        "UPDATE summaries SET level = CASE WHEN family = '__mean__' THEN 'balanced' ELSE 'pair' END "
        "WHERE level IS NULL",
        "UPDATE summaries SET family = NULL, pair_id = NULL WHERE level = 'balanced' AND family = '__mean__'",
    ],
    "events": ["UPDATE events SET event = 'first_diff' WHERE event IS NULL"],  # before event kinds: headline
}


def upgrade_columns(table: str, existing: list[str]) -> list[str]:
    """Statements that bring a results file written by an older crosspatch up to `table`'s schema.

    Missing columns are added (NULL on old rows, which stay queryable); old summaries rows get their
    `level` ('__mean__' rows become 'balanced'); their `headline` stays NULL (unknown).
    """
    missing = [f for f in TABLES[table] if f.name not in existing]
    if not missing:
        return []
    stmts = [f"ALTER TABLE {table} ADD COLUMN {f.name} {duck_type(f.type)}" for f in missing]
    return stmts + _BACKFILL.get(table, [])


def conform(table: str, data: pa.Table) -> pa.Table:
    """`data` cast to `table`'s part schema; a missing or extra column is a ValueError."""
    schema = PART_SCHEMAS[table]
    missing = set(schema.names) - set(data.column_names)
    extra = set(data.column_names) - set(schema.names)
    if missing or extra:
        raise ValueError(f"{table} part: missing columns {sorted(missing)}, unexpected {sorted(extra)}")
    return data.select(schema.names).cast(schema)


# Derived tables, maintained by the ingest transaction (never written by workers).
# feature_scores: one row per family x dictionary x layer x latent with its event-weighted mean attribution
# over every job that scored it (fit split), and its held-out single-feature ablation drop (test split:
# event-weighted mean; CI = the job's own percentile CI when one job measured it, else the normal
# approximation with SE = sqrt(sum (n_j se_j)^2) / sum n_j, se_j = (hi_j - lo_j) / (2 x 1.96)), so
# "top mediating features for a family" is a top-N scan, not a GROUP BY.
FEATURE_SCORES_COLUMNS = (
    ("family", "VARCHAR NOT NULL"),
    ("dictionary_id", "VARCHAR NOT NULL"),
    ("layer", "INTEGER"),
    ("latent", "BIGINT NOT NULL"),
    ("score", "DOUBLE"),
    ("n_events", "BIGINT"),
    ("n_jobs", "BIGINT"),
    ("heldout_drop", "DOUBLE"),
    ("heldout_ci_low", "DOUBLE"),
    ("heldout_ci_high", "DOUBLE"),
    ("heldout_n", "BIGINT"),
)
FEATURE_SCORES_DDL = "CREATE TABLE IF NOT EXISTS feature_scores ({})".format(
    ", ".join(f"{name} {kind}" for name, kind in FEATURE_SCORES_COLUMNS)
)

REFRESH_FEATURE_SCORES = """
    DELETE FROM feature_scores WHERE (family, dictionary_id) IN (SELECT family, dictionary_id FROM _touched);
    INSERT INTO feature_scores (family, dictionary_id, layer, latent, score, n_events, n_jobs,
                                heldout_drop, heldout_ci_low, heldout_ci_high, heldout_n)
    WITH attr AS (
        SELECT family, dictionary_id, any_value(layer) AS layer, latent, sum(effect * n) / sum(n) AS score,
               sum(n) AS n_events, count(DISTINCT job_id) AS n_jobs
        FROM feature_effects
        WHERE intervention = 'attribution' AND latent IS NOT NULL
          AND (family, dictionary_id) IN (SELECT family, dictionary_id FROM _touched)
        GROUP BY family, dictionary_id, latent
    ), held AS (
        SELECT family, dictionary_id, latent, sum(effect * n) / sum(n) AS drop_mean, count(*) AS m,
               any_value(ci_low) AS lo1, any_value(ci_high) AS hi1, sum(n) AS n_held,
               sqrt(sum(power(n * (ci_high - ci_low) / 3.919927969080108, 2))) / sum(n) AS se
        FROM feature_effects
        WHERE intervention = 'ablate_single' AND statistic = 'interaction_drop' AND latent IS NOT NULL
          AND n > 0 AND effect IS NOT NULL
          AND (family, dictionary_id) IN (SELECT family, dictionary_id FROM _touched)
        GROUP BY family, dictionary_id, latent
    )
    SELECT a.family, a.dictionary_id, a.layer, a.latent, a.score, a.n_events, a.n_jobs, h.drop_mean,
           CASE WHEN h.m = 1 THEN h.lo1 ELSE h.drop_mean - 1.959963984540054 * h.se END,
           CASE WHEN h.m = 1 THEN h.hi1 ELSE h.drop_mean + 1.959963984540054 * h.se END,
           h.n_held
    FROM attr a LEFT JOIN held h
      ON h.family = a.family AND h.dictionary_id = a.dictionary_id AND h.latent = a.latent;
"""

TOUCHED_BY_JOB = (
    "SELECT DISTINCT family, dictionary_id FROM feature_effects "
    "WHERE job_id = ? AND intervention = 'attribution' AND latent IS NOT NULL"
)
TOUCHED_ALL = (
    "SELECT DISTINCT family, dictionary_id FROM feature_effects "
    "WHERE intervention = 'attribution' AND latent IS NOT NULL"
)


# ---- what the tables and columns mean (DuckDB COMMENT ON, Parquet field metadata, docs/results.md) ----
JOB_ID_DOC = "the job that wrote the row (the ingest key: a rerun replaces the job's rows)"
APP_TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "provenance": (
        "One row per job: what ran and on what (written at ingest).",
        {
            "kind": "the job kind (crosspatch, pipeline, mediation, ...)",
            "spec": "the job spec as submitted (JSON)",
            "provenance": "models, revisions, tokenizer and weight hashes, versions, device, no-op checks, "
            "splits, gates (JSON)",
        },
    ),
    "feature_scores": (
        "Derived at ingest, one row per family x dictionary x latent: the top-features scan "
        "(app/store/queries.py top_features).",
        {
            "family": "model family",
            "dictionary_id": "the dictionary",
            "layer": "the layer whose MLP output the dictionary reads",
            "latent": "latent index",
            "score": "event-weighted mean fit-split attribution over every job that scored the latent",
            "n_events": "fit-split events behind the score",
            "n_jobs": "jobs behind the score",
            "heldout_drop": "held-out single-feature ablation drop of the interaction (event-weighted mean)",
            "heldout_ci_low": "lower end of its 95% CI (one job: its bootstrap CI; several: normal approx.)",
            "heldout_ci_high": "upper end of its 95% CI",
            "heldout_n": "held-out events behind the drop",
        },
    ),
}


def table_doc(table: str) -> tuple[str, dict[str, str]]:
    """(what one row is, {column: meaning}) of a results table, `job_id` included."""
    from crosspatch.engine.result_docs import TABLE_DOCS

    what, cols = TABLE_DOCS.get(table) or APP_TABLE_DOCS[table]
    return what, {"job_id": JOB_ID_DOC, **cols}


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def comment_statements(table: str, columns: list[str]) -> list[str]:
    """COMMENT ON TABLE / COLUMN statements for `table`'s existing `columns` (DuckDB `DESCRIBE` reads them)."""
    what, cols = table_doc(table)
    stmts = [f"COMMENT ON TABLE {table} IS {_sql_text(what)}"]
    stmts += [f"COMMENT ON COLUMN {table}.{c} IS {_sql_text(cols[c])}" for c in columns if c in cols]
    return stmts


def with_descriptions(table: str, data: pa.Table) -> pa.Table:
    """`data` (rows of `table`) with each column's meaning as Arrow field metadata, for Parquet downloads."""
    from crosspatch.engine.result_docs import DESCRIPTION

    what, cols = table_doc(table)
    fields = [
        f.with_metadata({**(f.metadata or {}), DESCRIPTION: cols[f.name].encode()}) if f.name in cols else f
        for f in data.schema
    ]
    schema = pa.schema(fields, metadata={**(data.schema.metadata or {}), DESCRIPTION: what.encode()})
    return pa.Table.from_arrays(data.columns, schema=schema)


def documented_tables() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """Every DuckDB results table as (name, what a row is, [(column, type, meaning)]) for docs/results.md."""
    out = []
    for table, schema in TABLES.items():
        what, cols = table_doc(table)
        columns = [("job_id", "VARCHAR", cols["job_id"])]
        columns += [(f.name, duck_type(f.type), cols[f.name]) for f in schema]
        out.append((table, what, columns))
    what, cols = table_doc("feature_scores")
    out.append(("feature_scores", what, [(n, k.split()[0], cols[n]) for n, k in FEATURE_SCORES_COLUMNS]))
    return out


if __name__ == "__main__":
    import sys

    from crosspatch.engine.result_docs import markdown

    sys.stdout.write(markdown(documented_tables()))
