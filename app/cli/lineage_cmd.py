"""`crosspatch lineage`: fixed-support lineage sweep (method 4.7) in process, one row per stage printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq
import typer

from crosspatch.app.cli import cli
from crosspatch.engine.errors import CrosspatchError


def _stages(stage: list[str], organism_root: Path | None) -> dict[str, str]:
    """NAME=PATH entries (or bare NAMEs of an organism's `stages/` folder) -> {name: path}, in order."""
    out: dict[str, str] = {}
    for entry in stage:
        name, sep, path = entry.partition("=")
        if not sep:
            if organism_root is None:
                raise CrosspatchError(f"--stage {entry!r}: give NAME=PATH (bare names only with --organism)")
            path = str(organism_root / "stages" / name)
        if not name or name in out:
            raise CrosspatchError(f"--stage {entry!r}: stage names must be non-empty and unique")
        out[name] = path
    if not out:
        raise CrosspatchError("give at least one --stage")
    return out


def _contrasts(contrast: list[str], stages: dict[str, str]) -> list[tuple[str, str]]:
    pairs = []
    for entry in contrast:
        a, sep, b = entry.partition(":")
        if not sep or a not in stages or b not in stages or a == b:
            raise CrosspatchError(f"--contrast {entry!r}: give A:B, two different stages of {list(stages)}")
        pairs.append((a, b))
    return pairs


@cli.command("lineage")
def lineage(
    stage: Annotated[
        list[str], typer.Option(help="A descendant: NAME=PATH (or NAME with --organism). Repeatable.")
    ],
    pt: Annotated[str | None, typer.Option(help="The base model (PT): HF id or local path.")] = None,
    it: Annotated[str | None, typer.Option(help="The final descendant that defines the support.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL prompt file.")] = None,
    organism: Annotated[str | None, typer.Option(help="A bundled organism (e.g. llama_lineage).")] = None,
    reference: Annotated[
        str | None, typer.Option(help="Stage the shares refer to (default: the last).")
    ] = None,
    contrast: Annotated[
        list[str] | None,
        typer.Option(help="A:B, interaction of stage A minus B with the sign-flip p. Repeatable."),
    ] = None,
    boundary: Annotated[
        str, typer.Option(help="Late-stack start: fraction or layer index (one boundary).")
    ] = "0.6",
    readout: Annotated[str, typer.Option(help="it, pt or own.")] = "it",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Greedy budget of the support's divergence.")
    ] = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    out: Annotated[Path | None, typer.Option(help="Parquet file for the per-stage rows.")] = None,
    seed: Annotated[int, typer.Option(help="Bootstrap / permutation seed.")] = 23,
) -> None:
    """Score every stage as IT against the base on the support pair's events; print one row per stage."""
    from crosspatch.app.cli.run_cmd import _resolve_pair_args
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.pairs import load_model, load_pair
    from crosspatch.engine.prompts import load_prompts
    from crosspatch.engine.recipe import contrast_table, lineage_sweep, single_boundary, summarize_lineage

    root = None
    if organism:
        from crosspatch.engine.organisms import organism_path

        root = organism_path(organism)
    stages = _stages(stage, root)
    pairs = _contrasts(contrast or [], stages)
    if reference is not None and reference not in stages:
        raise CrosspatchError(f"--reference {reference!r} is not one of the stages {list(stages)}")
    pt, it, prompts, pair_id = _resolve_pair_args(pt, it, organism, prompts)
    pair = load_pair(pt, it, device=device, dtype=dtype, pair_id=pair_id)
    try:
        b = single_boundary(pair, boundary)
        events = find_divergences(pair, load_prompts(prompts, limit=limit), max_new_tokens, batch_size)
        models = {name: load_model(path, device=device, dtype=dtype) for name, path in stages.items()}
        cells = lineage_sweep(
            pair.pt,
            {n: m for n, (m, _) in models.items()},
            pair.tokenizer,
            events,
            b,
            readout,
            reference,
            base_id=pair.pair_id,
            stage_tokenizers={n: t for n, (_, t) in models.items() if t is not None},
            batch_size=batch_size,
        )
        rows = summarize_lineage(cells, reference, seed=seed)
        table = contrast_table(cells, pairs, seed=seed) if pairs else None
    except ValueError as e:
        raise CrosspatchError(str(e)) from None
    ref = reference or list(stages)[-1]
    typer.echo(
        f"lineage of {pair.pair_id} at boundary {b} ({readout} readout), {rows['n'][0].as_py()} events"
    )
    typer.echo(f"{'stage':<12} {'interaction [95% CI]':<28} {'p':>8} {'share of ' + ref:>16} {'portable':>9}")
    for r in rows.to_pylist():
        ci = f"{r['interaction']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        share = r["share_of_reference"]
        share_text = f"{share:.1%}" if share == share else "n/a"  # nan: the reference's interaction is 0
        typer.echo(
            f"{r['stage']:<12} {ci:<28} {r['p_value']:>8.2g} {share_text:>16} {r['portable_share']:>9.2f}"
        )
    for r in table.to_pylist() if table is not None else []:
        typer.echo(
            f"contrast {r['stage_a']} - {r['stage_b']}: {r['estimate']:+.3f} [{r['ci_low']:+.3f}, "
            f"{r['ci_high']:+.3f}], sign-flip p {r['p_value']:.2g} (n={r['n']})"
        )
    if out:
        pq.write_table(rows, out)
        typer.echo(f"wrote {rows.num_rows} stage rows to {out}")
