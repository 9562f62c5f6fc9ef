"""`crosspatch summarize`: pair, family and family-balanced rows from cells Parquet files, no models needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from crosspatch.app.cli import cli
from crosspatch.engine.errors import CrosspatchError


def read_cells(paths: list[Path]) -> pa.Table:
    """Concatenate cells Parquet files (one or many pairs) in `CELLS_SCHEMA`; a bad file is one clear error."""
    from crosspatch.engine.results import CELLS_SCHEMA

    tables = []
    for path in paths:
        if not path.is_file():
            raise CrosspatchError(f"no cells file {str(path)!r}")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise CrosspatchError(f"cannot read {str(path)!r} as Parquet: {e}") from None
        if "near_tie" not in table.column_names:  # written before near-tie flags: unknown, not an error
            table = table.append_column("near_tie", pa.nulls(table.num_rows, pa.bool_()))
        missing = [c for c in CELLS_SCHEMA.names if c not in table.column_names]
        if missing:
            raise CrosspatchError(
                f"{path} is not a cells table of this crosspatch (missing {', '.join(missing)}); "
                "rerun `crosspatch run` to write one"
            )
        tables.append(table.select(CELLS_SCHEMA.names).cast(CELLS_SCHEMA))
    return pa.concat_tables(tables)


def write_summary(summary: pa.Table, out: Path) -> None:
    """Write a summary table atomically (tmp + rename), creating the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    pq.write_table(summary, tmp)
    tmp.replace(out)


def print_summary(summary: pa.Table) -> None:
    """The sweep table (when some pair has several boundaries), then the headline table."""
    import pyarrow.compute as pc

    from crosspatch.engine.report import format_summary, format_sweep

    pair_rows = summary.filter(pc.equal(summary["level"], "pair"))
    swept = any(
        len(set(pair_rows.filter(pc.equal(pair_rows["pair_id"], p))["boundary"].to_pylist())) > 1
        for p in set(pair_rows["pair_id"].to_pylist())
    )
    if swept:
        for readout in sorted(set(pair_rows["readout"].to_pylist())):
            typer.echo(f"readout: {readout}")
            typer.echo(format_sweep(summary, readout=readout))
            typer.echo("")
    typer.echo(format_summary(summary))


@cli.command("summarize")
def summarize_cmd(
    cells: Annotated[
        list[Path], typer.Argument(help="Cells Parquet file(s) from `crosspatch run`, any pairs.")
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Write the summary table (Parquet).")] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap and permutation seed.")] = 23,
    n_resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    n_permutations: Annotated[int, typer.Option(min=99, help="Sign-flip permutations.")] = 20000,
    position_min: Annotated[
        list[int] | None, typer.Option(help="Also summarise events at position >= K. Repeatable.")
    ] = None,
    by_category: Annotated[bool, typer.Option(help="Also summarise per prompt category.")] = False,
) -> None:
    """Per pair, per family and family-balanced estimates with CIs and p-values from cells files."""
    from crosspatch.engine.stats import summarize

    table = read_cells(cells)
    try:
        summary = summarize(
            table,
            n_resamples=n_resamples,
            seed=seed,
            position_min=tuple(position_min if position_min is not None else (3, 5)),
            by_category=by_category,
            n_permutations=n_permutations,
        )
    except ValueError as e:
        raise CrosspatchError(str(e)) from None
    pairs = sorted(set(table["pair_id"].to_pylist()))
    typer.echo(f"{table.num_rows} cell rows, {len(pairs)} pair(s): {', '.join(pairs)}\n")
    print_summary(summary)
    if out is not None:
        write_summary(summary, out)
        typer.echo(f"\nwrote {summary.num_rows} summary rows to {out}")
