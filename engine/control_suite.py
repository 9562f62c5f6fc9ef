"""The controls of the 2x2 (method sections 4.3-4.6, 4.8, 5.6) run together at one boundary, as result tables.

One entry point for the worker (crosspatch and pipeline jobs with `controls: [...]`), the CLI
(`crosspatch controls`, `crosspatch run --controls`) and the library:

    run_controls(pair, events, ["offmanifold", "commitment", "baselines", "native_history", "anatomy",
                                "identity_transfer", "source_decomposition", "closure"], boundary)
        -> ControlRun(tables={table name: Arrow table}, noop={source: native-history no-op report})

Tables (the DuckDB tables of the same names; schemas in the engine modules):
    interpolation, signperm, offmanifold    engine.offmanifold (per event x alpha / seed; summary rows)
    boundary_margins, commitment            engine.commitment (per event; one row per view)
    baseline_cells, baselines               engine.baselines (the 2x2 per condition; one row per condition);
                                            native_history adds conditions native_pt_history /
                                            native_it_history (events averaged within prompt, no share)
    anatomy_events, anatomy                 engine.anatomy (per event x measure; one row per statistic)
    identity_transfer_events, identity_transfer
                                            engine.identity_transfer (per event x host x window; one row
                                            per host x window x statistic)
    source_decomposition_events, source_decomposition
                                            engine.source_decomposition (per event x source; one row per
                                            source x statistic)
    closure_cells, closure                  engine.closure (per boundary x held-out event x arm x rank x
                                            alpha; one row per boundary x arm x rank x alpha; the
                                            wrong-descendant arm needs `wrong_descendant`, else not valid)
`format_controls(tables)` renders the printed report lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from crosspatch.engine.control_schemas import NO_SECOND_DESCENDANT

if TYPE_CHECKING:  # this module stays torch-free (the API's job schemas take the names and defaults)
    from crosspatch.engine.divergence import DivergenceEvent
    from crosspatch.engine.pairs import ModelPair

CONTROLS: tuple[str, ...] = (
    "offmanifold",
    "commitment",
    "baselines",
    "native_history",
    "anatomy",
    "identity_transfer",
    "source_decomposition",
    "closure",
)
# control -> the tables it writes
CONTROL_TABLES: dict[str, tuple[str, ...]] = {
    "offmanifold": ("interpolation", "signperm", "offmanifold"),
    "commitment": ("boundary_margins", "commitment"),
    "baselines": ("baseline_cells", "baselines"),
    "native_history": ("baseline_cells", "baselines"),
    "anatomy": ("anatomy_events", "anatomy"),
    "identity_transfer": ("identity_transfer_events", "identity_transfer"),
    "source_decomposition": ("source_decomposition_events", "source_decomposition"),
    "closure": ("closure_cells", "closure"),
}


@dataclass(frozen=True)
class ControlOptions:
    """Knobs of the controls (defaults follow the method)."""

    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_bins: int = 4
    rollout_tokens: int = 64
    n_tries: int = 8
    horizons: tuple[int, ...] = (4, 8, 16)
    selection_seed: int = 0
    n_resamples: int = 2000
    seed: int = 23
    batch_size: int = 16
    windows: tuple[int, ...] = (3, 1)  # anatomy: final-k windows
    mlp_windows: tuple[int, ...] = (3,)  # identity transfer: final-k MLP grafts
    ranks: tuple[int | str, ...] = (1, 4, 16, 64, 256, "full")  # closure
    closure_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5)
    closure_positions: str = "last"
    fit_fraction: float = 0.5  # closure: train share; `selection_seed` seeds its split and control draws
    closure_boundaries: tuple[int, ...] | None = None  # closure: boundaries (None: the control's boundary)


@dataclass
class ControlRun:
    """What `run_controls` returns: table name -> table, and the native-history no-op reports by source."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    noop: dict[str, dict] = field(default_factory=dict)


def check_controls(controls: Sequence[str]) -> list[str]:
    """The controls in canonical order; an unknown or repeated name is a ValueError."""
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; choose from {', '.join(CONTROLS)}")
    if len(set(controls)) != len(controls):
        raise ValueError("controls must be unique")
    return [c for c in CONTROLS if c in controls]


def run_controls(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    controls: Sequence[str],
    boundary: int,
    readout: str = "it",
    options: ControlOptions | None = None,
    cells: pa.Table | None = None,
    on_progress: Callable[[str], None] | None = None,
    wrong_descendant: ModelPair | None = None,
) -> ControlRun:
    """Run `controls` on `events` (one per prompt) at `boundary` with `readout`: their tables by name.

    `cells`: the 2x2 of these events (any boundaries/readouts; the commitment view joins on it), else
    computed here when needed. `wrong_descendant`: the base paired with a second descendant (closure).
    """
    from crosspatch.engine import baselines as bl
    from crosspatch.engine import commitment as cm
    from crosspatch.engine import offmanifold as om
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.noop import noop_report

    opts = options or ControlOptions()
    names = check_controls(controls)
    say = on_progress or (lambda _msg: None)
    scored = [e for e in events if e.diverged]
    if not scored:
        raise ValueError("no diverged events: the controls have nothing to score")
    run = ControlRun()
    out = run.tables
    if "offmanifold" in names:
        say(f"{pair.pair_id}: off-manifold checks (alphas {list(opts.alphas)}, seeds {list(opts.seeds)})")
        interp, perm = om.offmanifold(
            pair, scored, boundary, readout, opts.alphas, opts.seeds, opts.batch_size
        )
        summary = om.summarize_offmanifold(interp, perm, opts.n_resamples, opts.seed)
        out |= {
            "interpolation": interp,
            "signperm": perm,
            "offmanifold": om.offmanifold_table(summary, interp),
        }
    if "commitment" in names:
        say(f"{pair.pair_id}: pre-late commitment (IT boundary logit lens)")
        here = _cells_at(cells, boundary, readout)
        if here is None:
            here = crosspatch(pair, scored, boundary, (readout,), opts.batch_size, check_noop=False)
        margins = cm.boundary_margins(pair, scored, boundary, opts.batch_size)
        _, table = cm.commitment_summary(here, margins, None, opts.n_bins, opts.n_resamples, opts.seed)
        out |= {"boundary_margins": margins, "commitment": table}
    parts, summaries = [], []
    if "baselines" in names:
        say(f"{pair.pair_id}: selection baselines (rollouts of {opts.rollout_tokens} tokens)")
        bc = bl.baseline_cells(
            pair, events, boundary, readout, opts.rollout_tokens, opts.n_tries, opts.selection_seed,
            opts.batch_size,
        )  # fmt: skip
        _, table = bl.summarize_baselines(bc, opts.n_resamples, opts.seed)
        parts.append(bc)
        summaries.append(table)
    if "native_history" in names:
        for source in ("pt", "it"):
            say(f"{pair.pair_id}: native {source.upper()} history at horizons {list(opts.horizons)}")
            native = bl.native_history_events(
                pair, events, source, opts.horizons, opts.rollout_tokens, opts.batch_size
            )
            if not native:
                continue
            nc = crosspatch(pair, native, boundary, (readout,), opts.batch_size)  # no-op checked
            report = noop_report(nc)
            if report is not None:
                run.noop[source] = report
            nc = bl.with_condition(nc, f"native_{source}_history")
            if nc.num_rows:
                parts.append(nc)
                summaries.append(_native_row(nc, f"native_{source}_history", opts))
    if "anatomy" in names:
        from crosspatch.engine.anatomy import anatomy

        say(f"{pair.pair_id}: depth/window anatomy (final-k windows {list(opts.windows)})")
        out["anatomy_events"], out["anatomy"] = anatomy(
            pair, scored, boundary, readout, opts.windows, opts.batch_size, opts.n_resamples, opts.seed
        )
    if "identity_transfer" in names:
        from crosspatch.engine.identity_transfer import identity_transfer

        say(f"{pair.pair_id}: identity transfer (window grafts; final-k MLPs {list(opts.mlp_windows)})")
        out["identity_transfer_events"], out["identity_transfer"] = identity_transfer(
            pair, scored, boundary, readout, opts.mlp_windows, opts.batch_size, opts.n_resamples, opts.seed
        )
    if "source_decomposition" in names:
        from crosspatch.engine.source_decomposition import source_decomposition

        say(f"{pair.pair_id}: source decomposition of the upstream difference (embedding / attention / MLP)")
        out["source_decomposition_events"], out["source_decomposition"] = source_decomposition(
            pair, scored, boundary, readout, opts.batch_size, opts.n_resamples, opts.seed
        )
    if "closure" in names:
        from crosspatch.engine.closure import closure

        at = list(opts.closure_boundaries) if opts.closure_boundaries else boundary
        say(
            f"{pair.pair_id}: boundary-state closure at {at} (ranks {list(opts.ranks)}, alphas "
            f"{list(opts.closure_alphas)})"
        )
        out["closure_cells"], out["closure"] = closure(
            pair, scored, at, readout, opts.ranks, opts.closure_alphas, opts.closure_positions,
            opts.fit_fraction, opts.selection_seed, opts.selection_seed, opts.batch_size, opts.n_resamples,
            opts.seed, wrong_descendant,
        )  # fmt: skip
    if parts:
        out["baseline_cells"] = pa.concat_tables(parts).cast(bl.BASELINE_CELLS_SCHEMA)
        out["baselines"] = pa.concat_tables(summaries).cast(bl.BASELINE_SUMMARY_SCHEMA)
    return run


def _cells_at(cells: pa.Table | None, boundary: int, readout: str) -> pa.Table | None:
    """The rows of `cells` at `boundary` and `readout` (None if there are none)."""
    if cells is None or cells.num_rows == 0:
        return None
    keep = pc.and_(pc.equal(cells["boundary"], boundary), pc.equal(cells["readout"], readout))
    sub = cells.filter(keep)
    return sub if sub.num_rows else None


def _native_row(cells: pa.Table, condition: str, opts: ControlOptions) -> pa.Table:
    """A baselines row for one native-history arm: events averaged within prompt, prompt-bootstrap CI."""
    from crosspatch.engine.baselines import BASELINE_SUMMARY_SCHEMA, clustered_interaction

    mean, lo, hi, n_events, _ = clustered_interaction(cells, opts.n_resamples, opts.seed)
    keys = {k: cells.column(k)[0].as_py() for k in ("family", "pair_id", "boundary", "readout")}
    row = {**keys, "condition": condition, "n": n_events, "interaction": mean, "ci_low": lo, "ci_high": hi}
    row |= {"share": None, "share_ci_low": None, "share_ci_high": None}
    return pa.Table.from_pylist([row], schema=BASELINE_SUMMARY_SCHEMA)


def _ci(estimate: float | None, lo: float | None, hi: float | None) -> str:
    if estimate is None or estimate != estimate:
        return "n/a"
    if lo is None or lo != lo:
        return f"{estimate:+.3f}"
    return f"{estimate:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def format_controls(tables: dict[str, pa.Table]) -> str:
    """Printed report lines of the controls (one block per control that ran)."""
    lines: list[str] = []
    if "offmanifold" in tables:
        for pair_id in sorted(set(tables["offmanifold"].column("pair_id").to_pylist())):
            rows = [r for r in tables["offmanifold"].to_pylist() if r["pair_id"] == pair_id]
            by = {r["statistic"]: r for r in rows if r["statistic"] != "curve"}
            curve = ", ".join(
                f"{r['alpha']:g}: {r['estimate']:+.2f}" for r in rows if r["statistic"] == "curve"
            )
            s, q = by["slope"], by["signperm_ratio"]
            lines.append(
                f"off-manifold  {pair_id} (b={s['boundary']}, n={s['n']}): interpolation slope "
                f"{_ci(s['estimate'], s['ci_low'], s['ci_high'])}; curve C(a) {{{curve}}}; "
                f"signed-permutation random/observed {_ci(q['estimate'], q['ci_low'], q['ci_high'])}"
            )
    if "commitment" in tables:
        for r in tables["commitment"].to_pylist():
            if r["view"] in ("all", "uncommitted", "intercept"):
                label = {"all": "all events", "uncommitted": "uncommitted (margin <= 0)",
                         "intercept": "margin-adjusted intercept"}[r["view"]]  # fmt: skip
                lines.append(
                    f"commitment    {r['pair_id']}: {label:<27} {_ci(r['estimate'], r['ci_low'], r['ci_high'])}"
                    f"  n={r['n']}"
                )
    if "baselines" in tables:
        for r in tables["baselines"].to_pylist():
            share = "" if r["share"] is None or r["share"] != r["share"] else f"  share {r['share']:.0%}"
            lines.append(
                f"baselines     {r['pair_id']}: {r['condition']:<20} "
                f"{_ci(r['interaction'], r['ci_low'], r['ci_high'])}  n={r['n']}{share}"
            )
    if "anatomy" in tables:
        said: set[tuple] = set()
        for r in tables["anatomy"].to_pylist():
            if not r["valid"] and r["k"] is not None:  # one line per window that cannot be measured
                if (r["pair_id"], r["k"]) in said:
                    continue
                said.add((r["pair_id"], r["k"]))
                r = {**r, "statistic": "window"}
            what = r["statistic"] + (f" k={r['k']}" if r["k"] is not None else f" {r['band']}")
            span = f"blocks {r['layer_start']}..{r['layer_stop'] - 1}"
            value = (
                _ci(r["estimate"], r["ci_low"], r["ci_high"]) if r["valid"] else f"not valid: {r['reason']}"
            )
            lines.append(f"anatomy       {r['pair_id']}: {what:<27} {span:<13} {value}")
    for table, label, what in (
        ("identity_transfer", "transfer", lambda r: f"{r['host']} host {r['graft']} {r['window_name']} {r['statistic']}"),
        ("source_decomposition", "sources", lambda r: f"{r['source']} {r['statistic']}"),
    ):  # fmt: skip
        for r in tables.get(table, pa.table({})).to_pylist():
            span = f" blocks {r['layer_start']}..{r['layer_stop'] - 1}" if "layer_start" in r else ""
            value = (
                _ci(r["estimate"], r["ci_low"], r["ci_high"]) if r["valid"] else f"not valid: {r['reason']}"
            )
            lines.append(f"{label:<13} {r['pair_id']} (b={r['boundary']}): {what(r):<40}{span:<15} {value}")
    if "closure" in tables:
        said = set()
        for r in tables["closure"].to_pylist():
            rank = "full" if r["full_delta"] else str(r["rank"])
            what = f"{r['arm']:<16} rank {rank:<5} alpha {r['alpha']:g}"
            if not r["valid"]:  # one line per rank it cannot fit, one per arm missing its precondition
                arm_wide = r["reason"] == NO_SECOND_DESCENDANT
                key = (r["pair_id"], r["boundary"], r["arm"] if arm_wide else rank)
                if arm_wide or r["reason"].startswith(f"rank {rank} "):
                    if key in said:
                        continue
                    said.add(key)
                    what = r["arm"] if arm_wide else f"rank {rank}"
            value = (
                _ci(r["closure"], r["ci_low"], r["ci_high"]) if r["valid"] else f"not valid: {r['reason']}"
            )
            lines.append(
                f"closure       {r['pair_id']} b={r['boundary']} ({r['positions']}): {what:<33} {value}"
            )
    return "\n".join(lines)
