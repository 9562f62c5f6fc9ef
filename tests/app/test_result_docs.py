"""Every results table and column says what it means: DuckDB comments, Parquet metadata, docs/results.md."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosspatch.app.store.duckdb import ResultsStore, to_parquet_bytes
from crosspatch.app.store.result_tables import TABLES, documented_tables, table_doc, with_descriptions
from crosspatch.engine.result_docs import DESCRIPTION, TABLE_DOCS, describe, markdown
from crosspatch.engine.results import CELLS_SCHEMA

ROOT = Path(__file__).resolve().parents[2]


def test_every_column_of_every_table_is_documented_and_docs_results_md_is_current() -> None:
    tables = documented_tables()  # raises KeyError naming an undocumented column
    assert {t for t, _, _ in tables} == {*TABLES, "feature_scores"}
    for table, what, columns in tables:
        assert what and all(doc for _, _, doc in columns), table
    for table, (_, cols) in TABLE_DOCS.items():  # no stale descriptions of columns that are gone
        assert set(cols) == set(TABLES[table].names), table
    assert (ROOT / "docs" / "results.md").read_text() == markdown(tables), (
        "docs/results.md is stale: python -m crosspatch.app.store.result_tables > docs/results.md"
    )


def test_duckdb_describes_its_own_tables(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.duckdb")
    store.close()
    import duckdb

    con = duckdb.connect(str(tmp_path / "r.duckdb"), read_only=True)
    comment = con.execute(
        "SELECT comment FROM duckdb_columns() WHERE table_name = 'cells' AND column_name = 'interaction'"
    ).fetchone()[0]
    assert comment == table_doc("cells")[1]["interaction"]
    (table_comment,) = con.execute(
        "SELECT comment FROM duckdb_tables() WHERE table_name = 'summaries'"
    ).fetchone()
    assert table_comment == table_doc("summaries")[0]
    job_id = con.execute(
        "SELECT comment FROM duckdb_columns() WHERE table_name = 'feature_scores' AND column_name = 'heldout_n'"
    ).fetchone()[0]
    assert job_id == table_doc("feature_scores")[1]["heldout_n"]
    con.close()


def test_parquet_downloads_and_engine_schemas_carry_the_descriptions() -> None:
    rows = pa.table({"prompt_id": ["p1"], "interaction": [1.5]})
    back = pq.read_table(io.BytesIO(to_parquet_bytes(with_descriptions("cells", rows))))
    assert (
        back.schema.field("interaction").metadata[DESCRIPTION].decode()
        == table_doc("cells")[1]["interaction"]
    )
    assert back.schema.metadata[DESCRIPTION].decode() == table_doc("cells")[0]
    described = describe(CELLS_SCHEMA, "cells")
    assert described.field("boundary").metadata[DESCRIPTION].startswith(b"index of the first late block")
    with pytest.raises(KeyError, match=r"cells\.nope has no description"):
        describe(pa.schema([("nope", pa.int32())]), "cells")
