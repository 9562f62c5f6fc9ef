"""`crosspatch demo`: the main job a newcomer runs first, on the bundled model organisms.

Runs first divergence + the 2x2 cross-patch on every bundled trained organism pair (one per family)
and prints the per-family table with 95% CIs and the family-balanced mean. Until the HTTP service lands
(issue 8), it runs in this process (library mode) and says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from app.cli import cli


def _demo_organisms(names: list[str] | None) -> list[str]:
    from engine.organisms import list_organisms, organism_path

    if names:
        return names
    trained = []
    for name in list_organisms("trained"):
        try:
            organism_path(name)
            trained.append(name)
        except FileNotFoundError:
            continue
    return trained or [n for n in list_organisms("constructed") if n.startswith("llama_")]


@cli.command("demo")
def demo(
    organism: Annotated[
        list[str] | None, typer.Option(help="Organism(s) to run (default: every bundled trained pair).")
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="Where the cells Parquet goes.")] = Path(".crosspatch/demo"),
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Run divergence + 2x2 cross-patching on the bundled organisms and print the per-family table."""
    from engine.crosspatch import crosspatch
    from engine.divergence import find_divergences
    from engine.organisms import organism_path
    from engine.pairs import load_pair
    from engine.prompts import load_prompts
    from engine.report import format_summary
    from engine.stats import summarize

    names = _demo_organisms(organism)
    typer.echo(
        "crosspatch demo (library mode: runs in this process; the HTTP-service demo arrives with the service)"
    )
    t0 = time.perf_counter()
    tables = []
    for name in names:
        root = organism_path(name)
        family = name.removeprefix("trained_") if name.startswith("trained_") else name
        pair = load_pair(root / "pt", root / "it", family=family, pair_id=name)
        prompts = load_prompts(root / "prompts.jsonl")
        events = find_divergences(pair, prompts, batch_size=batch_size)
        n_div = sum(e.diverged for e in events)
        cells = crosspatch(pair, events, batch_size=batch_size)
        typer.echo(
            f"  {name:<28} {pair.n_layers} layers, boundary {pair.default_boundary}: "
            f"{n_div}/{len(events)} prompts diverged"
        )
        tables.append(cells)
    cells = pa.concat_tables(tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(cells, out_dir / "cells.parquet")
    typer.echo("")
    typer.echo(format_summary(summarize(cells, position_min=(3,))))
    typer.echo(
        f"\ncells: {out_dir / 'cells.parquet'} ({cells.num_rows} rows), {time.perf_counter() - t0:.1f}s"
    )
