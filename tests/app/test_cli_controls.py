"""`crosspatch run --control ...`: the controls in process, printed and written, on `llama_paper_sized`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from crosspatch.app.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_prints_and_writes_the_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys,
        "run",
        "--organism",
        "llama_paper_sized",
        "--limit",
        "8",
        "--max-new-tokens",
        "16",
        "--out",
        str(tmp_path / "cells.parquet"),
        "--control",
        "offmanifold",
        "--control",
        "commitment",
        "--controls-out",
        str(tmp_path / "controls"),
    )
    assert code == 0, err
    assert "controls at boundary 3 (readout it): offmanifold, commitment" in out
    assert "off-manifold  llama_paper_sized (b=3, n=8): interpolation slope +" in out
    assert "commitment    llama_paper_sized: uncommitted (margin <= 0)" in out
    assert "secondary scales" in out and "portable share" in out
    slope = pq.read_table(tmp_path / "controls" / "offmanifold.parquet").to_pylist()
    (row,) = [r for r in slope if r["statistic"] == "slope"]
    assert row["ci_low"] > 0
    interp = pq.read_table(tmp_path / "controls" / "interpolation.parquet")
    cells = {r["prompt_id"]: r["interaction"] for r in pq.read_table(tmp_path / "cells.parquet").to_pylist()}
    ends = {r["prompt_id"]: r["contrast"] for r in interp.to_pylist() if r["alpha"] == 1.0}
    assert ends.keys() == cells.keys() and all(ends[p] == pytest.approx(cells[p], abs=1e-6) for p in cells)


def test_bad_control_or_event_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "c.parquet")
    code, _, err = _run(capsys, "run", "--organism", "llama_paper_sized", "--out", out, "--control", "nope")
    assert code == 1 and err.strip().count("\n") == 0 and "unknown control(s) ['nope']" in err
    code, _, err = _run(capsys, "run", "--organism", "llama_paper_sized", "--out", out, "--event", "first")
    assert code == 1 and "unknown event definition 'first'" in err


def test_lineage_command_prints_one_row_per_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lineage.parquet"
    code, text, err = _run(
        capsys,
        "lineage",
        "--organism",
        "llama_lineage",
        *("--stage", "sft", "--stage", "dpo", "--stage", "final", "--stage", "portable"),
        *("--reference", "final", "--contrast", "final:sft", "--limit", "12", "--max-new-tokens", "32"),
        *("--out", str(out)),
    )
    assert code == 0, err
    rows = {r["stage"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == ["sft", "dpo", "final", "portable"]
    assert rows["sft"]["interaction"] < rows["dpo"]["interaction"] < rows["final"]["interaction"]
    assert rows["final"]["share_of_reference"] == 1.0 and abs(rows["portable"]["interaction"]) < 1e-6
    assert "lineage of llama_lineage at boundary 3" in text and "contrast final - sft: +" in text
    code, _, err = _run(capsys, "lineage", "--organism", "llama_lineage", "--stage", "a", "--contrast", "a:b")
    assert code == 1 and "--contrast 'a:b'" in err
