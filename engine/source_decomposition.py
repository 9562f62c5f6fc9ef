"""Source decomposition of the upstream difference (method section 4.8, "source decomposition interaction").

The method reports the number without defining it; this reading is ours (INFERRED, docs/method.md). The
residual entering boundary b telescopes over the upstream blocks, h_b = h_0 + sum_{l<b} (a_l + m_l), with
    a_l = block_l(h_l with its MLP output zeroed) - h_l      the attention sublayer's write
    m_l = block_l(h_l) - block_l(h_l with its MLP zeroed)    the MLP sublayer's write (after any post-norm)
(MLP zeroed through `engine.hooks.mlp_hooks`; on a block without post-norms m_l is the MLP module's output).
Differencing each model's own pass splits the boundary difference, at every position, into three sources:
    D = h_b(IT) - h_b(PT) = D_embedding + D_attention + D_mlp
    D_embedding = h_0(IT) - h_0(PT),  D_attention = sum_l a_l(IT) - a_l(PT),  D_mlp = sum_l m_l(IT) - m_l(PT)
computed in float64 from the models' own activations; `reconstruction_error` = max |sum of sources - D|
is the exactness check (float64 rounding, ~1e-12; a run above `RECONSTRUCTION_TOL` raises).
Per source s the upstream U_s = U_PT + D_s (every position) is crossed with both late stacks:
    interaction_s = [Y(U_s, L_IT) - Y(U_s, L_PT)] - [Y(U_PT, L_IT) - Y(U_PT, L_PT)]
the 2x2 interaction when only that source's IT - PT difference is patched in; source 'all' (U_IT) is the
headline interaction, `share` = mean interaction_s / mean interaction_all, and `non_additivity` =
interaction_all - sum_s interaction_s (0 when the late stack reads the sources additively).

Forward work per batch: per model, b blocks run twice (with and without the MLP zeroed) up to the boundary,
the rest of the clean pass once, then 2 late stacks per source (6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.anatomy import control_boundary
from crosspatch.engine.control_schemas import SOURCE_DECOMPOSITION_EVENTS_SCHEMA, SOURCE_DECOMPOSITION_SCHEMA
from crosspatch.engine.crosspatch import CELLS, CleanPasses, event_batches, late_stack_final, readout_margin
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.hooks import mlp_hooks
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.recipe import ratio_of_means
from crosspatch.engine.results import event_key_columns
from crosspatch.engine.stats import bootstrap_ci

SOURCES: tuple[str, ...] = ("embedding", "attention", "mlp")
RECONSTRUCTION_TOL = 1e-6  # max |sum of sources - D| (float64 sums of fp32 activations; ~1e-12 measured)


def _zero_mlp(_x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(out)


@torch.no_grad()
def upstream_sources(
    pair: ModelPair, role: str, ids: torch.Tensor, mask: torch.Tensor, boundary: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, CleanPasses]:
    """One model's sources up to `boundary` ({source: `[batch, seq, d_model]` float64}), its float64 boundary
    residual and its clean pass (context, boundary input, final residual) from the same block runs."""
    adapter = pair.adapter(role)  # type: ignore[arg-type]
    position_ids = positions_from_mask(mask)  # [batch, seq]
    h = adapter.embed(ids, position_ids)  # [batch, seq, d_model]
    ctx = adapter.context(h, mask, position_ids)
    parts = {"embedding": h.double(), "attention": torch.zeros_like(h, dtype=torch.float64)}
    parts["mlp"] = torch.zeros_like(parts["attention"])
    for layer in range(boundary):
        with mlp_hooks(adapter, {layer: _zero_mlp}):
            no_mlp = adapter.run_block(layer, h, ctx)  # [batch, seq, d_model]
        out = adapter.run_block(layer, h, ctx)  # [batch, seq, d_model]
        parts["attention"] += no_mlp.double() - h.double().to(no_mlp.device)
        parts["mlp"] += out.double() - no_mlp.double()
        h = out
    final = adapter.run_layers(h, ctx, start=boundary)[0][:, -1]  # [batch, d_model]
    passes = CleanPasses(contexts={role: ctx}, captured={role: {boundary: h}}, final={role: final})
    return parts, h.double(), passes


def _merge(a: CleanPasses, b: CleanPasses) -> CleanPasses:
    return CleanPasses({**a.contexts, **b.contexts}, {**a.captured, **b.captured}, {**a.final, **b.final})


@torch.no_grad()
def source_decomposition(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    batch_size: int = 16,
    n_resamples: int = 2000,
    seed: int = 23,
) -> tuple[pa.Table, pa.Table]:
    """(SOURCE_DECOMPOSITION_EVENTS_SCHEMA rows per event x source, SOURCE_DECOMPOSITION_SCHEMA summary)."""
    b = control_boundary(pair, boundary, readout, batch_size)
    if b < 1:
        raise ValueError("the source decomposition needs at least one upstream block (boundary >= 1)")
    parts = []
    for batch, ids, mask, tokens in event_batches(pair, events, batch_size):
        pt_src, pt_h, pt_pass = upstream_sources(pair, "pt", ids, mask, b)
        it_src, it_h, it_pass = upstream_sources(pair, "it", ids, mask, b)
        passes = _merge(pt_pass, it_pass)
        diff = {s: it_src[s] - pt_src[s].to(it_src[s].device) for s in SOURCES}  # [batch, seq, d_model]
        diff["all"] = it_h - pt_h.to(it_h.device)  # [batch, seq, d_model] the boundary difference D
        err = (sum(diff[s] for s in SOURCES) - diff["all"]).abs().amax(dim=(1, 2))  # [batch]
        if float(err.max()) > RECONSTRUCTION_TOL:
            raise CrosspatchError(
                f"source decomposition does not reconstruct the boundary difference: {err.max():.3g}"
            )
        y = {
            cell: readout_margin(pair, readout, cell[1], late_stack_final(pair, *cell, passes, b), tokens)
            for cell in CELLS
        }  # (upstream, late) -> [batch]
        floor = y[("pt", "it")] - y[("pt", "pt")]  # PT-up late effect
        values = {"all": (y[("it", "it")] - y[("it", "pt")]) - floor}
        u_pt = passes.captured["pt"][b]  # [batch, seq, d_model]
        for s in SOURCES:
            u = (u_pt.double() + diff[s].to(u_pt.device)).to(u_pt.dtype)  # [batch, seq, d_model]
            late = {}
            for role in ("pt", "it"):
                adapter = pair.adapter(role)  # type: ignore[arg-type]
                final = adapter.run_layers(u.to(adapter.device), passes.contexts[role], start=b)[0][:, -1]
                late[role] = readout_margin(pair, readout, role, final, tokens)  # [batch]
            values[s] = (late["it"] - late["pt"]) - floor
        n = len(batch)
        for s, v in values.items():
            parts.append(
                pa.table(
                    {
                        **event_key_columns(pair.family, pair.pair_id, batch),
                        "boundary": [b] * n,
                        "readout": [readout] * n,
                        "source": [s] * n,
                        "interaction": v,
                        "diff_norm": diff[s][:, -1].norm(dim=-1).cpu().numpy(),
                        "reconstruction_error": err.cpu().numpy(),
                    },
                    schema=SOURCE_DECOMPOSITION_EVENTS_SCHEMA,
                )
            )
    per_event = pa.concat_tables(parts) if parts else SOURCE_DECOMPOSITION_EVENTS_SCHEMA.empty_table()
    per_event = per_event.sort_by([("source", "ascending"), ("prompt_id", "ascending")])
    return per_event, summarize_sources(pair, per_event, b, readout, n_resamples, seed)


def summarize_sources(
    pair: ModelPair, per_event: pa.Table, boundary: int, readout: str, n_resamples: int = 2000, seed: int = 23
) -> pa.Table:
    """Per source: mean interaction (CI), share of the full interaction (ratio of means); non-additivity;
    the largest reconstruction error. No events: one not-valid row."""
    keys = {"family": pair.family, "pair_id": pair.pair_id, "boundary": boundary, "readout": readout}
    data = per_event.select(["prompt_id", "source", "interaction", "reconstruction_error"]).to_pylist()
    by = {
        s: np.array(
            [r["interaction"] for r in sorted(data, key=lambda r: r["prompt_id"]) if r["source"] == s]
        )
        for s in ("all", *SOURCES)
    }
    nan = float("nan")
    rows: list[dict] = []

    def row(source, statistic, est=nan, lo=nan, hi=nan, n=0, reason=None) -> None:
        rows.append({**keys, "source": source, "statistic": statistic, "estimate": est, "ci_low": lo,
                     "ci_high": hi, "n": n, "valid": reason is None, "reason": reason})  # fmt: skip

    full = by["all"]
    if len(full) == 0:
        row("all", "interaction", reason="no diverged events")
        return pa.Table.from_pylist(rows, schema=SOURCE_DECOMPOSITION_SCHEMA)
    n = len(full)
    for s in ("all", *SOURCES):
        row(s, "interaction", *bootstrap_ci(by[s], n_resamples, seed), n=n)
        if s == "all":
            continue
        if full.mean() == 0:
            row(s, "share", n=n, reason="the full interaction is 0")
        else:
            r = ratio_of_means(by[s], full, n_resamples, seed)
            row(s, "share", r.estimate, r.ci_low, r.ci_high, n)
    row("all", "non_additivity", *bootstrap_ci(full - sum(by[s] for s in SOURCES), n_resamples, seed), n=n)
    row("all", "reconstruction_error", max(r["reconstruction_error"] for r in data), n=n)
    return pa.Table.from_pylist(rows, schema=SOURCE_DECOMPOSITION_SCHEMA)
