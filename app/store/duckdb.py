"""The results store: the one owner of the DuckDB file in the service process.

While a process holds a DuckDB file for writing no other process can open it (duckdb #17158), so the
service opens it once; ingest and queries go through that one connection, a cursor per call, values
bound with `?`, identifiers only from `result_tables.TABLES`.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from crosspatch.app.store import queries
from crosspatch.app.store.result_tables import (
    FEATURE_SCORES_COLUMNS,
    FEATURE_SCORES_DDL,
    PART_SCHEMAS,
    REFRESH_FEATURE_SCORES,
    TABLES,
    TOUCHED_ALL,
    TOUCHED_BY_JOB,
    comment_statements,
    conform,
    ddl,
    upgrade_columns,
)
from crosspatch.engine.errors import CrosspatchError

# The results file is written in the storage format of DuckDB 1.1 (readable by every DuckDB >= 1.1, the 1.x
# CLI included), not the running library's newest format. DuckDB applies this only when it creates a file;
# tests/app/test_duckdb_compat.py opens a demo-style file with duckdb==OLDEST_READER.
STORAGE_COMPATIBILITY = "v1.1.0"
OLDEST_READER = "1.1.0"


class ResultsError(CrosspatchError):
    """The results store failed (locked file, bad part, DuckDB error)."""


class ResultsStore:
    """One DuckDB connection, a lock for writes, a cursor per read."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(
                self.path, config={"storage_compatibility_version": STORAGE_COMPATIBILITY}
            )
        except duckdb.Error as e:
            raise ResultsError(
                f"cannot open results file {self.path!r}: {e}. Another process (a running "
                "`crosspatch serve`?) holds it; query the results through that server instead."
            ) from e
        self._lock = threading.Lock()
        with self._lock:
            for table in TABLES:
                self._con.execute(ddl(table))
                existing = [r[0] for r in self._con.execute(f"DESCRIBE {table}").fetchall()]
                for stmt in upgrade_columns(table, existing):  # a file from an older crosspatch
                    self._con.execute(stmt)
            self._upgrade_feature_scores()
            for table in (*TABLES, "feature_scores"):  # what every table and column means, for DESCRIBE
                columns = [r[0] for r in self._con.execute(f"DESCRIBE {table}").fetchall()]
                for stmt in comment_statements(table, columns):
                    self._con.execute(stmt)

    def _upgrade_feature_scores(self) -> None:
        """Create `feature_scores`; a file written by an older version gets it rebuilt from feature_effects."""
        cols = [
            r[0]
            for r in self._con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'feature_scores' "
                "ORDER BY ordinal_position"
            ).fetchall()
        ]
        if cols == [name for name, _ in FEATURE_SCORES_COLUMNS]:
            return
        self._con.execute("DROP TABLE IF EXISTS feature_scores")
        self._con.execute(FEATURE_SCORES_DDL)
        cur = self._con.cursor()
        try:
            self._refresh_scores(cur, cur.sql(TOUCHED_ALL).to_arrow_table())
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            self._con.close()

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A fresh cursor (its own transaction context) on the one connection."""
        with self._lock:
            cur = self._con.cursor()
        try:
            yield cur
        except duckdb.Error as e:
            raise ResultsError(f"results query failed: {e}") from e
        finally:
            cur.close()

    # ---- ingest ------------------------------------------------------------------------------
    def ingest(
        self, job_id: str, parts: Sequence[tuple[str, str]], provenance: dict[str, Any]
    ) -> dict[str, int]:
        """Replace job `job_id`'s rows with its parts `(table, parquet path)`, in one transaction.

        `provenance` is {"kind", "spec", "provenance"}. Returns rows inserted per table.
        """
        loaded: dict[str, list[pa.Table]] = {}
        for table, path in parts:
            if table not in PART_SCHEMAS:
                raise ResultsError(f"part {path!r} names unknown table {table!r}")
            try:
                loaded.setdefault(table, []).append(conform(table, pq.read_table(path)))
            except (OSError, ValueError, pa.ArrowException) as e:
                raise ResultsError(f"cannot read part {path!r}: {e}") from e
        prov = pa.table(
            {
                "kind": [provenance.get("kind")],
                "spec": [json.dumps(provenance.get("spec"), sort_keys=True, default=str)],
                "provenance": [json.dumps(provenance.get("provenance"), sort_keys=True, default=str)],
            },
            schema=TABLES["provenance"],
        )
        counts: dict[str, int] = {}
        with self._replacing(job_id) as cur:
            for table, tables in [*loaded.items(), ("provenance", [prov])]:
                data = pa.concat_tables(tables)
                data = data.add_column(0, "job_id", pa.array([job_id] * len(data), pa.string()))
                cur.register("_part", data)
                cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _part")
                cur.unregister("_part")
                counts[table] = len(data)
        return counts

    def delete_job(self, job_id: str) -> None:
        """Remove every row of job `job_id`."""
        with self._replacing(job_id):
            pass

    @contextmanager
    def _replacing(self, job_id: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction: delete `job_id`'s rows, let the caller insert new ones, refresh derived scores.

        Any error rolls everything back, so a job's rows appear (or disappear) all at once.
        """
        with self._lock:
            cur = self._con.cursor()
            try:
                cur.begin()
                before = cur.sql(TOUCHED_BY_JOB, params=[job_id]).to_arrow_table()
                for table in TABLES:
                    cur.execute(f"DELETE FROM {table} WHERE job_id = ?", [job_id])
                yield cur
                after = cur.sql(TOUCHED_BY_JOB, params=[job_id]).to_arrow_table()
                self._refresh_scores(cur, pa.concat_tables([before, after]))
                cur.commit()
            except duckdb.Error as e:
                cur.rollback()
                raise ResultsError(f"results transaction for job {job_id} failed: {e}") from e
            except BaseException:
                cur.rollback()
                raise
            finally:
                cur.close()

    @staticmethod
    def _refresh_scores(cur: duckdb.DuckDBPyConnection, touched: pa.Table) -> None:
        """Recompute `feature_scores` for the (family, dictionary) groups a job added or removed."""
        if touched.num_rows == 0:
            return
        cur.register("_touched", touched)
        try:
            cur.execute(REFRESH_FEATURE_SCORES)
        finally:
            cur.unregister("_touched")

    # ---- fixed queries -----------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any]) -> pa.Table:
        with self.cursor() as cur:
            return cur.sql(sql, params=list(params)).to_arrow_table()

    def counts(self, job_id: str) -> dict[str, int]:
        """Rows per table for one job."""
        with self.cursor() as cur:
            return {
                t: cur.execute(f"SELECT count(*) FROM {t} WHERE job_id = ?", [job_id]).fetchone()[0]  # type: ignore[index]
                for t in TABLES
            }

    def job_table(self, table: str, job_id: str, *, limit: int, offset: int = 0) -> pa.Table:
        """A job's rows of `table` (events, cells or summaries) in a stable order."""
        order = {
            "events": "prompt_id",
            "cells": "prompt_id, boundary, readout",
            "summaries": "level, family, pair_id, headline DESC, boundary, depth, readout, subset, statistic",
            "feature_acts": "prompt_id, dictionary_id, latent",
            "feature_effects": "family, dictionary_id, intervention, latent",
            "gate_checks": "family, dictionary_id, check_name",
            "handoff": "level, pair_id, analysis, window_name, alpha, set_kind, statistic",
            "feature_upstream": "pair_id, dictionary_id, latent, split",
            "forced_tokens": "pair_id, prompt_id, branch",
            "forced_summaries": "level, pair_id, category, statistic, view",
            "continuation": "pair_id, prompt_id, variant, n",
            "continuation_summaries": "pair_id, variant, n, statistic",
            "lora_controls": "pair_id",
            # controls of the 2x2
            "interpolation": "pair_id, prompt_id, alpha",
            "signperm": "pair_id, prompt_id, seed",
            "offmanifold": "pair_id, statistic, alpha",
            "boundary_margins": "pair_id, prompt_id",
            "commitment": "pair_id, rowid",  # views in the engine's order
            "baseline_cells": "pair_id, condition, prompt_id, position",
            "baselines": "pair_id, rowid",  # conditions in the engine's order
            "lineage_cells": "stage, prompt_id",
            "lineage": "rowid",  # stages in the job's order
            "recipe_contrasts": "rowid",
            "anatomy_events": "pair_id, prompt_id, measure, k, band",
            "anatomy": "pair_id, rowid",  # statistics in the engine's order
            "identity_transfer_events": "pair_id, host, prompt_id, rowid",  # windows in the engine's order
            "identity_transfer": "pair_id, rowid",
            "source_decomposition_events": "pair_id, source, prompt_id",
            "source_decomposition": "pair_id, rowid",
            "closure_cells": "pair_id, boundary, prompt_id, arm, full_delta, rank, alpha",
            "closure": "pair_id, rowid",  # ranks and arms in the engine's order
        }
        if table not in order:
            raise ResultsError(f"unknown results table {table!r}; choose from {', '.join(order)}")
        return self._query(
            f"SELECT * EXCLUDE (job_id) FROM {table} WHERE job_id = ? ORDER BY {order[table]} LIMIT ? OFFSET ?",
            [job_id, limit, offset],
        )

    def provenance(self, job_id: str) -> dict[str, Any] | None:
        """The provenance row stored beside a job's results."""
        t = self._query("SELECT kind, spec, provenance FROM provenance WHERE job_id = ?", [job_id])
        if t.num_rows == 0:
            return None
        row = t.to_pylist()[0]
        return {
            "kind": row["kind"],
            "spec": json.loads(row["spec"]),
            "provenance": json.loads(row["provenance"]),
        }

    def query(self, name: str, **params: Any) -> pa.Table:
        """Run one of the fixed queries in `app.store.queries` by name with keyword parameters."""
        if name not in queries.QUERIES:
            raise ResultsError(f"unknown query {name!r}; choose from {', '.join(queries.QUERIES)}")
        with self.cursor() as cur:
            return queries.QUERIES[name](cur, **params)


def to_parquet_bytes(table: pa.Table) -> bytes:
    """`table` as a Parquet file in memory (for downloads)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
