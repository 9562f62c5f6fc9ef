"""Depth / window anatomy of the full-late interaction (method section 4.8) at one boundary b of L blocks.

Per event, with Y(U, L) = logit(t_IT) - logit(t_PT) through `readout` and I(s) the 2x2 interaction when
the late stack starts at block s (the upstream state is the residual entering block s, all positions):
    full_late_interaction     I(b), the headline interaction
    final_k_interaction       I(L - k): only the last k blocks' input is patched, i.e. the final k blocks
                              run from the other model's upstream (k = 1: the final block alone)
    final_k_retention         mean I(L - k) / mean I(b) (ratio of means, CI from shared prompt resamples)
    final_mlp_interaction     per cell M_k(U, L) = Y(U, L) - Y(U, L with the MLP outputs of blocks
                              L-k..L-1 zeroed), then the 2x2 interaction of M_k: the margin the final k MLPs
                              carry that depends on both the upstream state and the late weights
    mlp_support               pure IT pass: Y(IT, IT) - Y(IT, IT with the band's MLP outputs zeroed), per
                              depth band early [0, ceil(b/2)), middle [ceil(b/2), b), late [b, L)
A window k outside 1..L-b (the final k blocks must lie inside the late stack) or an empty band is reported
as a row with `valid` false and the reason, never dropped.

Forward work per batch: the 2x2's two clean passes (also capturing the inputs of every L-k and band start),
then 2 extra late stacks per valid k (the off-diagonal cells of I(L-k)), 4 per valid k for the final-MLP
margin (every cell from b with the MLP hooks) and one IT pass per band from the band's first block: with the
default k = (3, 1) on a deep pair, 4 + 8 late stacks + 3 partial IT passes. The 2x2 at b adds its own 2.
The method names the final-MLP margin interaction without defining it; the zero-ablation reading above is
ours (INFERRED), chosen because it is exact on the organisms (a mechanism only in the final MLP gives the
whole interaction; none there gives ~0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.control_schemas import ANATOMY_EVENTS_SCHEMA, ANATOMY_SCHEMA
from crosspatch.engine.crosspatch import (
    CleanPasses,
    clean_passes,
    event_batches,
    late_stack_final,
    readout_margin,
)
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.hooks import mlp_hooks
from crosspatch.engine.pairs import ModelPair, check_readout
from crosspatch.engine.recipe import ratio_of_means, single_boundary
from crosspatch.engine.stats import bootstrap_ci

DEFAULT_WINDOWS: tuple[int, ...] = (3, 1)  # final-three stack and final block, as the method reports them
BANDS: tuple[str, ...] = ("early", "middle", "late")


def depth_bands(boundary: int, n_layers: int) -> dict[str, tuple[int, int]]:
    """Band -> (start, stop) blocks: early [0, ceil(b/2)), middle [ceil(b/2), b), late [b, L)."""
    mid = math.ceil(boundary / 2)
    return {"early": (0, mid), "middle": (mid, boundary), "late": (boundary, n_layers)}


def _zero_mlps(layers: range) -> dict[int, object]:
    """{layer: hook} replacing each MLP output by zeros."""
    return {layer: (lambda _x, out: torch.zeros_like(out)) for layer in layers}


def _interaction(y: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
    """`[batch]` [Y(IT,IT) - Y(IT,PT)] - [Y(PT,IT) - Y(PT,PT)] from {(upstream, late): Y}."""
    return (y[("it", "it")] - y[("it", "pt")]) - (y[("pt", "it")] - y[("pt", "pt")])


def _cells(
    pair: ModelPair,
    passes: CleanPasses,
    start: int,
    readout: str,
    tokens: torch.Tensor,
    hooks: range = range(0),
) -> dict[tuple[str, str], np.ndarray]:
    """Y of the four cells with the late stack starting at `start`; with `hooks`, those blocks' MLPs zeroed."""
    out = {}
    for up in ("pt", "it"):
        for late in ("pt", "it"):
            if not len(hooks):
                final = late_stack_final(pair, up, late, passes, start)
            else:
                adapter = pair.adapter(late)
                resid = passes.captured[up][start].to(adapter.device)  # [batch, seq, d_model]
                with mlp_hooks(adapter, _zero_mlps(hooks)):
                    final = adapter.run_layers(resid, passes.contexts[late], start=start)[0][:, -1]
            out[(up, late)] = readout_margin(pair, readout, late, final, tokens)
    return out


@torch.no_grad()
def anatomy_batch(
    pair: ModelPair,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    boundary: int,
    readout: str,
    windows: Sequence[int],
) -> dict[tuple[str, int | None, str | None], np.ndarray]:
    """One batch: {(measure, k, band): `[batch]` values} for the valid windows and non-empty bands."""
    n_layers = pair.n_layers
    bands = {n: se for n, se in depth_bands(boundary, n_layers).items() if se[0] < se[1]}
    starts = sorted({boundary, *(n_layers - k for k in windows), *(s for s, _ in bands.values())})
    passes = clean_passes(pair, input_ids, attention_mask, starts)  # 2 full forwards
    full = _cells(pair, passes, boundary, readout, tokens)
    out: dict[tuple[str, int | None, str | None], np.ndarray] = {
        ("full_late_interaction", n_layers - boundary, None): _interaction(full)
    }
    for k in windows:
        out[("final_k_interaction", k, None)] = _interaction(
            _cells(pair, passes, n_layers - k, readout, tokens)
        )
        zeroed = _cells(pair, passes, boundary, readout, tokens, range(n_layers - k, n_layers))
        out[("final_mlp_interaction", k, None)] = _interaction(full) - _interaction(zeroed)
    it = pair.adapter("it")
    for name, (start, stop) in bands.items():
        resid = passes.captured["it"][start]  # [batch, seq, d_model]
        with mlp_hooks(it, _zero_mlps(range(start, stop))):
            final = it.run_layers(resid, passes.contexts["it"], start=start)[0][:, -1]  # [batch, d_model]
        out[("mlp_support", None, name)] = full[("it", "it")] - readout_margin(
            pair, readout, "it", final, tokens
        )
    return out


def control_boundary(
    pair: ModelPair,
    boundary: int | None,
    readout: str,
    batch_size: int,
    counts: Sequence[int] | None = None,
    name: str = "windows",
) -> int:
    """The one boundary a per-event control of section 4.8 runs at, after the checks they share: readout,
    batch size and (when given) distinct final-k block `counts`; a ValueError names the bad input."""
    check_readout(readout)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if counts is not None and (not counts or len(set(counts)) != len(counts)):
        raise ValueError(f"{name} must name distinct final-block counts, got {list(counts)}")
    return single_boundary(pair, boundary)


def _window_reason(k: int, boundary: int, n_layers: int) -> str | None:
    """Why window k cannot be measured at this boundary (None when it can)."""
    if k < 1 or k > n_layers - boundary:
        return f"the final {k} blocks are not inside the late stack {boundary}..{n_layers - 1} (k must be 1..{n_layers - boundary})"
    return None


def anatomy(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    windows: Sequence[int] = DEFAULT_WINDOWS,
    batch_size: int = 16,
    n_resamples: int = 2000,
    seed: int = 23,
) -> tuple[pa.Table, pa.Table]:
    """(per-event ANATOMY_EVENTS_SCHEMA rows, ANATOMY_SCHEMA summary rows) for the diverged `events`."""
    b = control_boundary(pair, boundary, readout, batch_size, windows)
    n_layers = pair.n_layers
    valid = [k for k in windows if _window_reason(k, b, n_layers) is None]
    bands = depth_bands(b, n_layers)
    parts = []
    for batch, ids, mask, tokens in event_batches(pair, events, batch_size):
        values = anatomy_batch(pair, ids, mask, tokens, b, readout, valid)
        n = len(batch)
        for (measure, k, band), v in values.items():
            start, stop = bands[band] if band else (n_layers - k, n_layers)
            cols = {
                "family": [pair.family] * n,
                "pair_id": [pair.pair_id] * n,
                "prompt_id": [e.prompt_id for e in batch],
                "category": [e.category for e in batch],
                "position": [e.position for e in batch],
                "boundary": [b] * n,
                "readout": [readout] * n,
                "measure": [measure] * n,
                "k": [k] * n,
                "band": [band] * n,
                "layer_start": [start] * n,
                "layer_stop": [stop] * n,
                "value": v,
            }
            parts.append(pa.table(cols, schema=ANATOMY_EVENTS_SCHEMA))
    per_event = pa.concat_tables(parts) if parts else ANATOMY_EVENTS_SCHEMA.empty_table()
    per_event = per_event.sort_by([("prompt_id", "ascending"), ("measure", "ascending")])
    return per_event, summarize_anatomy(pair, per_event, b, readout, windows, n_resamples, seed)


def _values(per_event: pa.Table, measure: str, k: int | None = None, band: str | None = None) -> np.ndarray:
    """`[events]` values of one measure, ordered by prompt id."""
    rows = [
        r
        for r in per_event.select(["prompt_id", "measure", "k", "band", "value"]).to_pylist()
        if r["measure"] == measure and (k is None or r["k"] == k) and (band is None or r["band"] == band)
    ]
    return np.array([r["value"] for r in sorted(rows, key=lambda r: r["prompt_id"])], dtype=np.float64)


def summarize_anatomy(
    pair: ModelPair,
    per_event: pa.Table,
    boundary: int,
    readout: str,
    windows: Sequence[int],
    n_resamples: int = 2000,
    seed: int = 23,
) -> pa.Table:
    """One ANATOMY_SCHEMA row per statistic: means with prompt-bootstrap CIs, retention as a ratio of means."""
    n_layers = pair.n_layers
    keys = {"family": pair.family, "pair_id": pair.pair_id, "boundary": boundary, "readout": readout}
    nan = float("nan")
    rows: list[dict] = []

    def row(statistic, k, band, span, est=nan, lo=nan, hi=nan, n=0, reason=None) -> None:
        rows.append({**keys, "statistic": statistic, "k": k, "band": band, "layer_start": span[0],
                     "layer_stop": span[1], "estimate": est, "ci_low": lo, "ci_high": hi, "n": n,
                     "valid": reason is None, "reason": reason})  # fmt: skip

    def mean_row(statistic, values, k, band, span) -> None:
        if len(values) == 0:
            row(statistic, k, band, span, reason="no diverged events")
        else:
            row(statistic, k, band, span, *bootstrap_ci(values, n_resamples, seed), n=len(values))

    full = _values(per_event, "full_late_interaction")
    mean_row("full_late_interaction", full, n_layers - boundary, None, (boundary, n_layers))
    for k in windows:
        span = (n_layers - k, n_layers)
        reason = _window_reason(k, boundary, n_layers)
        if reason is not None:
            for statistic in ("final_k_interaction", "final_k_retention", "final_mlp_interaction"):
                row(statistic, k, None, span, reason=reason)
            continue
        part = _values(per_event, "final_k_interaction", k=k)
        mean_row("final_k_interaction", part, k, None, span)
        if len(part) and full.mean() != 0:
            r = ratio_of_means(part, full, n_resamples, seed)
            row("final_k_retention", k, None, span, r.estimate, r.ci_low, r.ci_high, r.n)
        else:
            row("final_k_retention", k, None, span, reason="the full-late interaction is 0 (or no events)")
        mean_row("final_mlp_interaction", _values(per_event, "final_mlp_interaction", k=k), k, None, span)
    for band, span in depth_bands(boundary, n_layers).items():
        if span[0] >= span[1]:
            row("mlp_support", None, band, span, reason=f"band {band} is empty at boundary {boundary}")
        else:
            mean_row("mlp_support", _values(per_event, "mlp_support", band=band), None, band, span)
    return pa.Table.from_pylist(rows, schema=ANATOMY_SCHEMA)
