"""`crosspatch recipe paper-core5 [--dry-run]`: the method's Core-5 study on the shipped holdout-600.

`--dry-run` prints the plan (pairs, pinned revisions, boundaries, memory and wall-time estimates per stage)
without loading or downloading anything; without it the recipe runs in process on this host's GPU(s),
writing Parquet per pair and the cross-pair summaries (engine/paper.py). The same study as a service job:
`examples/paper_core5.json` (a pipeline job spec).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crosspatch.app.cli import cli
from crosspatch.engine.errors import CrosspatchError

recipe_app = typer.Typer(
    name="recipe", help="Paper recipes: whole studies in one command.", no_args_is_help=True
)
cli.add_typer(recipe_app, name="recipe")


@recipe_app.command("paper-core5")
def paper_core5(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; load nothing.")] = False,
    out: Annotated[Path, typer.Option(help="Output folder (Parquet per pair + summaries).")] = Path(
        "paper-core5"
    ),
    only: Annotated[list[str] | None, typer.Option(help="Run only these families (repeatable).")] = None,
    local: Annotated[
        list[str] | None,
        typer.Option(
            help="FAMILY=PT_DIR,IT_DIR: checkpoints already on disk (repeatable; revisions then unpinned)."
        ),
    ] = None,
    stages: Annotated[list[str] | None, typer.Option("--stage", help="Stages to run (repeatable).")] = None,
    device: Annotated[
        str, typer.Option(help="cuda, cuda:N, or a device map (balanced) for the 32B pair.")
    ] = "cuda",
    dtype: Annotated[str, typer.Option(help="bfloat16 as the paper, or float32.")] = "bfloat16",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    limit: Annotated[
        int | None, typer.Option(min=1, help="First N holdout prompts only (a smoke run).")
    ] = None,
) -> None:
    """The Core-5 study: divergence, 2x2 with CIs per family and family-balanced, controls, forced tokens,
    constrained continuation, on the shipped holdout-600 with the method's pinned checkpoints."""
    from dataclasses import replace

    from crosspatch.engine.holdout import load_holdout
    from crosspatch.engine.paper import (
        CORE5,
        RUN_STAGES,
        Assumptions,
        check_boundaries,
        plan,
        render,
        run_recipe,
    )

    families = [p.family for p in CORE5]
    for name in only or []:
        if name not in families:
            raise CrosspatchError(f"unknown family {name!r}; choose from {', '.join(families)}")
    pairs = [p for p in CORE5 if not only or p.family in only]
    for item in local or []:
        fam, _, paths = item.partition("=")
        pt, _, it = paths.partition(",")
        if fam not in families or not pt or not it:
            raise CrosspatchError(
                f"--local expects FAMILY=PT_DIR,IT_DIR with FAMILY in {', '.join(families)}"
            )
        pairs = [
            replace(p, pt=pt, it=it, pt_revision=None, it_revision=None) if p.family == fam else p
            for p in pairs
        ]
    check_boundaries()
    prompts = load_holdout(limit)
    assumptions = Assumptions(n_prompts=len(prompts), batch_size=batch_size)
    plans = [pp for pp in plan(assumptions) if pp.pair.family in {p.family for p in pairs}]
    typer.echo(render(plans, assumptions))
    if dry_run:
        typer.echo("\n(dry run: nothing loaded or downloaded)")
        return
    run_recipe(
        pairs, prompts, out, device=device, dtype=dtype, batch_size=batch_size, stages=stages or RUN_STAGES
    )
