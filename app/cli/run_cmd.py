"""`crosspatch run`: divergence + 2x2 cross-patch on one PT/IT pair, in process (no server needed)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from crosspatch.app.cli import cli
from crosspatch.app.cli.progress import divergences_with_bar, progress_bar
from crosspatch.engine.errors import CrosspatchError

if TYPE_CHECKING:  # imported where used: the CLI starts without torch
    from crosspatch.engine.divergence import DivergenceEvent
    from crosspatch.engine.pairs import ModelPair

log = logging.getLogger("crosspatch.run")


def _resolve_pair_args(pt: str | None, it: str | None, organism: str | None, prompts: Path | None):
    """`--organism NAME` fills --pt/--it/--prompts from a bundled organism; otherwise all are required."""
    if organism:
        from crosspatch.engine.organisms import organism_path

        try:
            root = organism_path(organism)
        except ValueError as e:
            raise CrosspatchError(str(e)) from None
        return str(root / "pt"), str(root / "it"), prompts or root / "prompts.jsonl", organism
    missing = [flag for flag, v in (("--pt", pt), ("--it", it), ("--prompts", prompts)) if not v]
    if missing:
        raise CrosspatchError(f"missing {', '.join(missing)} (or use --organism NAME)")
    return pt, it, prompts, None


@cli.command("run")
def run(
    out: Annotated[Path, typer.Option("--out", help="Parquet file for the cells table.")],
    pt: Annotated[str | None, typer.Option(help="PT (base) model: HF id or local path.")] = None,
    it: Annotated[str | None, typer.Option(help="IT model: HF id or local path.")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="JSONL prompt file (id, prompt|formats, category...).")
    ] = None,
    organism: Annotated[
        str | None, typer.Option(help="A bundled model organism instead of --pt/--it.")
    ] = None,
    family: Annotated[
        str | None, typer.Option(help="Family label for results (default: architecture).")
    ] = None,
    boundary: Annotated[
        str, typer.Option(help="Late-stack start: fraction (0.6), layer index, or 'sweep'.")
    ] = "0.6",
    readout: Annotated[
        list[str] | None, typer.Option(help="Readout(s): it (common-IT), pt, own. Repeatable.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Greedy budget to find the first divergence.")
    ] = 128,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (accelerate device map).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    events_out: Annotated[Path | None, typer.Option(help="Also write the events table (Parquet).")] = None,
    summary_out: Annotated[
        Path | None, typer.Option(help="Also write the summary table (Parquet), as `crosspatch summarize`.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 23,
    chat_template: Annotated[
        bool, typer.Option(help="Wrap prompts in IT's chat template (IT-only studies; the method uses raw).")
    ] = False,
    event: Annotated[
        str,
        typer.Option(
            help="Event definition: first_diff (headline), first_nonformat_diff, first_assistant_marker_diff."
        ),
    ] = "first_diff",
    control: Annotated[
        list[str] | None,
        typer.Option(
            help="Also run a control of the 2x2 at the headline boundary (offmanifold, commitment, baselines, anatomy, "
            "identity_transfer, source_decomposition, closure, native_history) and print it. Repeatable."
        ),
    ] = None,
    rollout_tokens: Annotated[
        int, typer.Option(min=1, help="Greedy rollout length of the baselines / native-history controls.")
    ] = 64,
    controls_out: Annotated[
        Path | None, typer.Option(help="Directory for the controls' tables (<table>.parquet).")
    ] = None,
    wrong_descendant: Annotated[
        str | None,
        typer.Option(
            help="Closure's wrong-descendant control: a second descendant of the same PT (path or id)."
        ),
    ] = None,
) -> None:
    """Find first divergences, run the 2x2 cross-patch, print the per-family table with 95% CIs."""
    from crosspatch.app.cli.summarize_cmd import print_summary, write_summary
    from crosspatch.engine.control_suite import check_controls
    from crosspatch.engine.crosspatch import iter_crosspatch
    from crosspatch.engine.event_kinds import check_kind
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.prompts import load_prompts
    from crosspatch.engine.report import format_event_counts
    from crosspatch.engine.results import CELLS_SCHEMA, events_table
    from crosspatch.engine.stats import summarize

    readout = readout or ["it"]
    try:
        controls = check_controls(control or [])
        check_kind(event)
    except ValueError as e:
        raise CrosspatchError(str(e)) from None
    pt, it, prompts, organism = _resolve_pair_args(pt, it, organism, prompts)
    records = load_prompts(prompts, limit=limit)
    t0 = time.perf_counter()
    pair = load_pair(pt, it, device=device, dtype=dtype, family=family, pair_id=organism)
    bounds = pair.resolve_boundaries(boundary)  # validate before any model work
    typer.echo(
        f"pair {pair.pair_id} ({pair.family}, {pair.n_layers} layers), {len(records)} prompts, boundary {boundary}"
    )
    events = divergences_with_bar(
        pair, records, max_new_tokens, batch_size, chat_template, event=event, capture=bounds
    )  # the 2x2 below runs fused: only its off-diagonal late stacks
    typer.echo(format_event_counts(events))
    n_div = sum(e.diverged for e in events)
    with progress_bar("2x2 cross-patch", n_div) as bar:
        parts = list(
            iter_crosspatch(
                pair,
                events,
                bounds,
                readout,
                batch_size,
                on_batch=lambda d, n: bar.update(d, n),
                on_noop=lambda r: typer.echo(r.summary()),
            )
        )
    cells = pa.concat_tables(parts) if parts else CELLS_SCHEMA.empty_table()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    pq.write_table(cells, tmp)
    tmp.replace(out)  # never a half-written results file
    if events_out:
        pq.write_table(events_table(events, pair.family, pair.pair_id), events_out)
    summary = summarize(cells, seed=seed, position_min=(3, 5))
    typer.echo("")
    print_summary(summary)
    if summary_out:
        write_summary(summary, summary_out)
        typer.echo(f"\nwrote {summary.num_rows} summary rows to {summary_out}")
    if controls:
        _run_controls(
            pair,
            events,
            cells,
            controls,
            boundary,
            readout[0],
            rollout_tokens,
            seed,
            batch_size,
            controls_out,
            load_pair(pt, wrong_descendant, device=device, dtype=dtype, family=family)
            if wrong_descendant
            else None,
        )
    typer.echo(f"\nwrote {cells.num_rows} cell rows to {out} in {time.perf_counter() - t0:.1f}s")


def _run_controls(
    pair: ModelPair,
    events: list[DivergenceEvent],
    cells: pa.Table,
    controls: list[str],
    boundary: str,
    readout: str,
    rollout_tokens: int,
    seed: int,
    batch_size: int,
    out_dir: Path | None,
    wrong_descendant: ModelPair | None = None,
) -> None:
    """Run the controls in process at the pair's headline boundary, print their lines, write their tables."""
    from crosspatch.engine.control_suite import ControlOptions, format_controls, run_controls

    b = pair.headline_boundary(boundary)
    typer.echo(f"\ncontrols at boundary {b} (readout {readout}): {', '.join(controls)}")
    options = ControlOptions(rollout_tokens=rollout_tokens, seed=seed, batch_size=batch_size)
    try:
        run = run_controls(pair, events, controls, b, readout, options, cells, log.info, wrong_descendant)
    except ValueError as e:
        raise CrosspatchError(str(e)) from None
    typer.echo(format_controls(run.tables))
    for source, report in run.noop.items():
        typer.echo(
            f"native {source.upper()} history no-op check: max |diff| {max(report['max_abs_diff'].values()):.1e}"
        )
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, table in run.tables.items():
            pq.write_table(table, out_dir / f"{name}.parquet")
        typer.echo(f"wrote {len(run.tables)} control tables to {out_dir}")
