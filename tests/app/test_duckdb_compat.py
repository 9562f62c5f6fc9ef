"""The results DuckDB file opens with the oldest DuckDB the project claims (the 1.x CLI line reads it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crosspatch.app.store.duckdb import OLDEST_READER, ResultsStore
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.results import events_table
from crosspatch.engine.stats import summarize


@pytest.fixture(scope="module")
def old_duckdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """duckdb==OLDEST_READER installed into a throwaway target dir (skipped if the index is unreachable)."""
    target = tmp_path_factory.mktemp("duckdb_old")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:"]
    r = subprocess.run(
        [*cmd, "--target", str(target), f"duckdb=={OLDEST_READER}"], capture_output=True, text=True
    )
    if r.returncode != 0:
        reason = f"cannot install duckdb=={OLDEST_READER} from the package index: {r.stderr.strip()[-300:]}"
        print(f"\n{reason}")
        pytest.skip(reason)
    return target


def test_demo_results_file_opens_with_the_oldest_claimed_duckdb(tmp_path: Path, old_duckdb: Path) -> None:
    # a demo-style file: the library 2x2 on a bundled organism, ingested as the service ingests a job
    root = organism_path("trained_llama")
    pair = load_pair(root / "pt", root / "it", family="llama", pair_id="trained_llama")
    events = find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=12), batch_size=12)
    cells = crosspatch(pair, events, batch_size=12)
    parts = {
        "events": events_table(events, "llama", "trained_llama"),
        "cells": cells,
        "summaries": summarize(cells),
    }
    paths = []
    for name, table in parts.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        paths.append((name, str(tmp_path / f"{name}.parquet")))
    db = tmp_path / "results.duckdb"
    store = ResultsStore(db)
    counts = store.ingest("job-1", paths, {"kind": "crosspatch", "spec": {}, "provenance": {}})
    store.close()
    assert counts["cells"] == cells.num_rows > 0

    code = (
        "import duckdb, json, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "n = {t: con.execute(f'SELECT count(*) FROM {t}').fetchone()[0] for t in sys.argv[2:]}\n"
        "print(json.dumps({'version': duckdb.__version__, 'counts': n}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(db), *parts, "provenance"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(old_duckdb), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == OLDEST_READER
    assert out["counts"] == {**{k: v.num_rows for k, v in parts.items()}, "provenance": 1}
