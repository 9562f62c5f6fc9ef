"""`crosspatch mediate`: rank, ablate and rescue dictionary features on one pair, in process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq
import typer

from crosspatch.app.cli import cli
from crosspatch.app.cli.progress import divergences_with_bar, progress_bar
from crosspatch.app.cli.run_cmd import _resolve_pair_args


@cli.command("mediate")
def mediate(
    dictionary: Annotated[
        list[str],
        typer.Option(
            "--dict",
            help="sae_lens-format dictionary dir, or sae_lens:RELEASE/SAE_ID from the local Hugging Face "
            "cache (repeatable).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for feature_effects / feature_acts Parquet.")],
    pt: Annotated[str | None, typer.Option(help="PT model id or path.")] = None,
    it: Annotated[str | None, typer.Option(help="IT model id or path.")] = None,
    pair: Annotated[
        str | None, typer.Option("--pair", help="A bundled organism name (instead of --pt/--it).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL prompt file.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Features in the top set.")] = 200,
    ks: Annotated[str, typer.Option(help="Comma list of set sizes for the curve.")] = "25,50,100,200",
    ablation: Annotated[str, typer.Option(help="zero (method) or pt_value.")] = "zero",
    boundary: Annotated[int | None, typer.Option(help="Late-stack start (default round(0.6 L)).")] = None,
    fit_fraction: Annotated[float, typer.Option(help="Share of events used for ranking.")] = 0.27,
    n_random_seeds: Annotated[int, typer.Option(min=5, help="Seeds per control (>= 5).")] = 5,
    neighbours: Annotated[
        int, typer.Option(min=1, help="Matched-random candidates per feature (nearest by rate x |score|).")
    ] = 50,
    allow_failed_gate: Annotated[bool, typer.Option(help="Use dictionaries below the quality gate.")] = False,
    handoff: Annotated[
        bool,
        typer.Option(
            help="Also run the handoff chain (method §5.4-5.5): gate, rescue dose-response, MLP-window grafts."
        ),
    ] = False,
    alphas: Annotated[str, typer.Option(help="Comma list: the rescue dose-response grid (with 0).")] = (
        "0,0.5,1,1.5,2"
    ),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (accelerate device map).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    limit: Annotated[int, typer.Option(help="Show this many top features.")] = 20,
    chat_template: Annotated[
        bool,
        typer.Option(
            help="Wrap prompts in IT's chat template. Off by default: the method's headline is raw-shared "
            "(identical raw token ids); templated runs are a native-chat variant."
        ),
    ] = False,
) -> None:
    """Rank final-layer features by attribution, ablate / rescue the top-k with controls, print effects."""
    from crosspatch.engine.errors import CrosspatchError
    from crosspatch.engine.handoff import HandoffConfig, feature_upstream_table
    from crosspatch.engine.mediation import BranchView, MediationConfig
    from crosspatch.engine.mediation import mediate as run_mediation
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.prompts import load_prompts
    from crosspatch.engine.report import format_checks, format_effects, format_handoff
    from crosspatch.saes.load import resolve_dictionary
    from crosspatch.saes.quality import require_gate

    handoff_cfg = None
    if handoff:
        try:
            handoff_cfg = HandoffConfig(alphas=tuple(float(a) for a in alphas.split(",") if a.strip()))
            handoff_cfg.validate()
        except (ValueError, CrosspatchError) as e:
            raise typer.BadParameter(f"--alphas {alphas!r}: {e}") from None
    pt, it, prompts, organism = _resolve_pair_args(pt, it, pair, prompts)
    t0 = time.perf_counter()
    dicts, gates = [], []
    for ref in dictionary:
        d = resolve_dictionary(ref, device=device)
        gates.append(
            require_gate(d, override=allow_failed_gate, reason="crosspatch mediate --allow-failed-gate")
        )
        dicts.append(BranchView(d, "it"))
    model_pair = load_pair(pt, it, device=device, dtype=dtype, pair_id=organism)
    records = load_prompts(prompts)
    events = divergences_with_bar(model_pair, records, max_new_tokens, batch_size, chat_template)
    cfg = MediationConfig(
        top_k=top_k,
        ks=tuple(int(k) for k in ks.split(",") if k.strip()),
        ablation=ablation,  # type: ignore[arg-type]
        boundary=boundary,
        fit_fraction=fit_fraction,
        n_random_seeds=n_random_seeds,
        neighbours=neighbours,
        batch_size=batch_size,
        allow_failed_gate=allow_failed_gate,
        handoff=handoff_cfg,
    )
    with progress_bar("mediation") as bar:
        steps = [0]

        def note(message: str) -> None:
            steps[0] += 1
            bar.update(steps[0], note=message) if bar.enabled else typer.echo(f"  {message}")

        result = run_mediation(model_pair, events, dicts, cfg, on_progress=note)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.effects, out / "feature_effects.parquet")
    pq.write_table(result.feature_acts, out / "feature_acts.parquet")
    n_events = {
        (model_pair.pair_id, "fit"): len(result.fit_ids),
        (model_pair.pair_id, "test"): len(result.test_ids),
    }
    pq.write_table(feature_upstream_table(result.feature_acts, n_events), out / "feature_upstream.parquet")
    typer.echo(format_effects(result.effects, limit))
    if result.handoff is not None:
        pq.write_table(result.handoff.table, out / "handoff.parquet")
        typer.echo(format_handoff(result.handoff.table))
    for lab in result.k_labels:
        if lab["size"] != lab["requested"]:
            typer.echo(
                f"note: k={lab['requested']} has {lab['size']} positive-score features; labelled {lab['size']}"
            )
    typer.echo(format_checks(result.checks, result.controls))
    for g in gates:
        if g["overridden"]:
            failed = ", ".join(g["override"]["failed"]) or "not evaluated"
            typer.echo(
                f"note: dictionary {g['dictionary']} is below the quality gate ({g['gate_status']}: {failed}); "
                "used by override, recorded in its crosspatch_meta.json"
            )
    typer.echo(
        f"\nwrote {out}/feature_effects.parquet, feature_acts.parquet, feature_upstream.parquet"
        f"{', handoff.parquet' if result.handoff is not None else ''} in {time.perf_counter() - t0:.1f}s"
    )
