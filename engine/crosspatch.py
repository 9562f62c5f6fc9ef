"""The 2x2 cross-patch: each model's upstream state crossed with each model's late stack.

For a batch of events (prompt + shared prefix, scored at the last position):
  1. PT and IT run one clean forward each (no cache). These give the diagonal cells and capture the
     residual entering every requested boundary block, at every position.
  2. For each boundary b, IT's late stack (blocks b..L-1) runs on PT's captured residual, and PT's late
     stack on IT's: the off-diagonal cells.
That is all the forward work the 2x2 needs: two full passes plus two late-stack passes per boundary.
A boundary sweep reuses step 1 for every b.
Fused path (the pipeline's and CLI's default): events from `iter_divergences(capture=boundaries)` carry
step 1's results from the decoding pass itself (`DivergenceEvent.capture`: boundary inputs at every position
of prompt + shared prefix, and the diagonal final residuals), so only step 2 runs; the captures are
consumed (released) as their batch is scored. Events without a capture take the unfused path.
On the first batch only, the runtime no-op checks (`engine.noop`) compare that batch's clean passes
(fused: its first `NOOP_EVENTS` events) with each model's own forward before any cell is kept.

Y = logit(t_it) - logit(t_pt), read through the chosen readout: common-IT (IT's final norm and
unembedding for every cell, the method's default), common-PT, or each late stack's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import ArchAdapter, LayerContext, positions_from_mask
from crosspatch.engine.divergence import DivergenceEvent, left_pad, left_pad_to
from crosspatch.engine.memory import release_host_memory
from crosspatch.engine.noop import NoopReport, attach, check_cells_noop
from crosspatch.engine.pairs import ModelPair, check_readout
from crosspatch.engine.results import CELL_COLUMNS, CELLS_SCHEMA
from crosspatch.engine.streams import reported

if TYPE_CHECKING:  # engine.staged imports this module
    from crosspatch.engine.staged import StagedPair, StateStore

NOOP_EVENTS = 8  # events of the first fused batch the no-op check runs on (it costs two HF forwards)

# (upstream, late) -> column
CELLS: dict[tuple[str, str], str] = {
    ("pt", "pt"): "y_ptup_ptlate",
    ("pt", "it"): "y_ptup_itlate",
    ("it", "pt"): "y_itup_ptlate",
    ("it", "it"): "y_itup_itlate",
}


@dataclass
class CleanPasses:
    """What the two clean forwards leave behind for one batch: contexts, boundary inputs, final residuals."""

    contexts: dict[str, LayerContext]  # role -> masks/rotary of that model
    captured: dict[str, dict[int, torch.Tensor]]  # role -> boundary -> [batch, seq, d_model]
    final: dict[str, torch.Tensor]  # role -> [batch, d_model] at the scored (last) position


@torch.no_grad()
def clean_passes(
    pair: ModelPair, input_ids: torch.Tensor, attention_mask: torch.Tensor, boundaries: Sequence[int]
) -> CleanPasses:
    """One plain forward of PT and of IT (no cache), capturing the residual entering each boundary block."""
    position_ids = positions_from_mask(attention_mask)  # [batch, seq]
    passes = CleanPasses(contexts={}, captured={}, final={})
    for role in ("pt", "it"):
        adapter = pair.adapter(role)
        resid = adapter.embed(input_ids, position_ids)  # [batch, seq, d_model]
        passes.contexts[role] = adapter.context(resid, attention_mask, position_ids)
        out, passes.captured[role] = adapter.run_layers(
            resid, passes.contexts[role], capture_inputs=boundaries
        )
        passes.final[role] = out[:, -1]  # [batch, d_model]
    return passes


def late_stack_final(
    pair: ModelPair, upstream: str, late: str, passes: CleanPasses, boundary: int
) -> torch.Tensor:
    """`[batch, d_model]` final residual at the scored position of cell (upstream, late) at `boundary`.

    Diagonal cells come straight from the clean passes; off-diagonal cells run `late`'s blocks
    boundary..L-1 on `upstream`'s captured residual (any hooks on those blocks fire here).
    """
    if upstream == late:
        return passes.final[late]
    resid = passes.captured[upstream][boundary]  # [batch, seq, d_model]
    return pair.adapter(late).run_layers(resid, passes.contexts[late], start=boundary)[0][:, -1]


def margin(adapter: ArchAdapter, final_resid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`[batch, d_model]` final residual -> `[batch]` Y = logit(t_it) - logit(t_pt); `tokens` is `[batch, 2]` (t_it, t_pt)."""
    logits = adapter.readout(final_resid.to(adapter.device), tokens.to(adapter.device)).float()  # [batch, 2]
    return logits[:, 0] - logits[:, 1]


def readout_margin(
    pair: ModelPair, readout: str, late: str, final: torch.Tensor, tokens: torch.Tensor
) -> np.ndarray:
    """`[batch]` float64 margin of the `late` model's final residual through `readout` (own: `late`'s head)."""
    adapter = pair.adapter(late if readout == "own" else readout)
    return margin(adapter, final, tokens).double().cpu().numpy()  # [batch]


@torch.no_grad()
def crosspatch_batch(
    pair: ModelPair,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    t_pt: torch.Tensor,
    t_it: torch.Tensor,
    boundaries: Sequence[int],
    readouts: Sequence[str] = ("it",),
    passes: CleanPasses | None = None,
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """The four cells for a left-padded batch, per (boundary, readout): `{column: [batch] fp32}`.

    `passes`: this batch's clean passes if already computed (the no-op check reuses them).
    """
    tokens = torch.stack([t_it, t_pt], dim=-1)  # [batch, 2]
    if passes is None:
        passes = clean_passes(pair, input_ids, attention_mask, boundaries)  # 2 full forwards
    results: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for b in boundaries:
        finals = {cell: late_stack_final(pair, *cell, passes, b) for cell in CELLS}  # 2 late stacks
        for readout in readouts:
            results[(b, readout)] = {
                CELLS[(up, late)]: margin(pair.adapter(late if readout == "own" else readout), h, tokens)
                for (up, late), h in finals.items()
            }
    return results


def event_batches(
    pair: ModelPair, events: Sequence[DivergenceEvent], batch_size: int
) -> Iterator[tuple[list[DivergenceEvent], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted batches of diverged events as (events, ids, mask, tokens[t_it, t_pt])."""
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    device = pair.pt_adapter.device
    for batch in length_batches([e for e in events if e.diverged], batch_size):
        ids, mask = left_pad([e.input_ids for e in batch], pad, device)
        tokens = torch.tensor([[e.t_it, e.t_pt] for e in batch], device=device)  # [batch, 2]
        yield batch, ids, mask, tokens


def has_capture(event: DivergenceEvent, boundaries: Sequence[int]) -> bool:
    """True when the event carries the decoding pass's capture of every boundary (the fused path)."""
    cap = event.capture
    return event.diverged and cap is not None and set(boundaries) <= set(cap.boundaries)


def fused_passes(
    pair: ModelPair, batch: Sequence[DivergenceEvent], boundaries: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CleanPasses]:
    """(ids, mask, tokens[t_it, t_pt], clean passes) of captured events, rebuilt from their captures (no forward)."""
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    passes = CleanPasses(contexts={}, captured={}, final={})
    for role in ("pt", "it"):
        adapter = pair.adapter(role)
        ids, mask = left_pad([e.input_ids for e in batch], pad, adapter.device)
        width = ids.shape[1]
        passes.captured[role] = {
            b: torch.stack([left_pad_to(e.capture.inputs[role][b], width, 0) for e in batch]).to(
                adapter.device
            )
            for b in boundaries
        }  # each [batch, seq, d_model]; padded positions are zeros, masked out of every real position
        passes.final[role] = torch.stack([e.capture.final[role] for e in batch]).to(adapter.device)
        first = passes.captured[role][boundaries[0]]
        passes.contexts[role] = adapter.context(first, mask, positions_from_mask(mask))
    ids, mask = left_pad([e.input_ids for e in batch], pad, pair.pt_adapter.device)
    tokens = torch.tensor([[e.t_it, e.t_pt] for e in batch], device=pair.pt_adapter.device)  # [batch, 2]
    return ids, mask, tokens, passes


def fused_batches(
    pair: ModelPair, events: Sequence[DivergenceEvent], boundaries: Sequence[int], batch_size: int
) -> Iterator[tuple[list[DivergenceEvent], torch.Tensor, torch.Tensor, torch.Tensor, CleanPasses]]:
    """As `event_batches`, plus each batch's clean passes rebuilt from the events' captures (no forward).

    A batch's captures are released when the consumer asks for the next batch, so host memory stays
    bounded by the batches not yet scored.
    """
    for batch in length_batches([e for e in events if has_capture(e, boundaries)], batch_size):
        yield batch, *fused_passes(pair, batch, boundaries)
        for e in batch:
            e.capture = None  # consumed


def length_batches(events: Sequence[DivergenceEvent], batch_size: int) -> Iterator[list[DivergenceEvent]]:
    """Length-sorted batches (less padding); results are re-ordered by the caller's keys."""
    order = sorted(events, key=lambda e: len(e.input_ids))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def cells_plan(
    pair: ModelPair,
    boundary: int | float | str | Sequence[int] | None,
    readouts: Sequence[str],
    batch_size: int,
    headline: int | None,
) -> tuple[list[int], int]:
    """Check the 2x2's arguments and resolve (boundaries, headline); shared with `engine.staged`."""
    for r in readouts:
        check_readout(r)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    boundaries = pair.resolve_boundaries(boundary)
    headline = pair.headline_boundary(boundary) if headline is None else headline
    if headline not in boundaries:
        raise ValueError(f"headline boundary {headline} is not among the boundaries {boundaries}")
    return boundaries, headline


def iter_crosspatch(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | float | str | Sequence[int] | None = None,
    readouts: Sequence[str] = ("it",),
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
    check_noop: bool = True,
    on_noop: Callable[[NoopReport], None] | None = None,
    headline: int | None = None,
) -> Iterator[pa.Table]:
    """Stream the cells table batch by batch (see `engine.results.CELLS_SCHEMA`).

    Only diverged events are scored; activations live for one batch at a time. Events carrying a capture
    of every boundary (`iter_divergences(capture=...)`) are scored first, on the fused path (late stacks
    only). With `check_noop`, the first batch (fused: its first `NOOP_EVENTS` events) runs the runtime
    no-op checks (`engine.noop`): `on_noop` receives the report, and a failure raises `NoopCheckError` before any table is yielded. Every row records the pair's headline
    boundary: `headline`, or `ModelPair.headline_boundary(boundary)`.
    """
    boundaries, headline = cells_plan(pair, boundary, readouts, batch_size, headline)
    unfused = (
        (*batch, None)
        for batch in event_batches(pair, [e for e in events if not has_capture(e, boundaries)], batch_size)
    )
    batches = chain(fused_batches(pair, events, boundaries, batch_size), unfused)
    n_scored = sum(e.diverged for e in events)
    for i, (batch, ids, mask, tokens, passes) in enumerate(reported(batches, n_scored, on_batch)):
        if passes is None:
            passes = clean_passes(pair, ids, mask, boundaries)  # 2 full forwards
        if check_noop and i == 0:
            if has_capture(batch[0], boundaries):  # fused: the HF forwards of the check on a few events
                report = check_cells_noop(
                    pair, *fused_passes(pair, batch[:NOOP_EVENTS], boundaries), boundaries
                )
            else:
                report = check_cells_noop(pair, ids, mask, tokens, passes, boundaries)
            if on_noop:
                on_noop(report)
            report.raise_if_failed()
        cells = crosspatch_batch(pair, ids, mask, tokens[:, 1], tokens[:, 0], boundaries, readouts, passes)
        del passes
        yield _cells_table(pair, batch, cells, headline)
        del cells
        if ids.device.type == "cpu":
            release_host_memory()  # keep peak RSS flat across batches of different widths


def _cells_table(
    pair: ModelPair,
    batch: list[DivergenceEvent],
    cells: dict[tuple[int, str], dict[str, torch.Tensor]],
    headline: int,
) -> pa.Table:
    """One row per event x (boundary, readout); effects computed in float64 from the four cells."""
    n = len(batch)
    event_cols = {
        "prompt_id": [e.prompt_id for e in batch],
        "category": [e.category for e in batch],
        "position": np.array([e.position for e in batch], dtype=np.int32),
        "t_pt": np.array([e.t_pt for e in batch], dtype=np.int64),
        "t_it": np.array([e.t_it for e in batch], dtype=np.int64),
        "near_tie": [e.near_tie for e in batch],
    }
    parts = []
    for (b, readout), values in cells.items():
        y = {c: values[c].double().cpu().numpy() for c in CELL_COLUMNS}  # each [batch]
        pt_late = y["y_ptup_itlate"] - y["y_ptup_ptlate"]
        it_late = y["y_itup_itlate"] - y["y_itup_ptlate"]
        cols = {
            "family": [pair.family] * n,
            "pair_id": [pair.pair_id] * n,
            **event_cols,
            "boundary": np.full(n, b, dtype=np.int32),
            "readout": [readout] * n,
            "pair_label": [pair.pair_label] * n,
            "n_layers": np.full(n, pair.n_layers, dtype=np.int32),
            "headline_boundary": np.full(n, headline, dtype=np.int32),
            **y,
            "pt_late_effect": pt_late,
            "it_late_effect": it_late,
            "interaction": it_late - pt_late,
        }
        parts.append(pa.table(cols, schema=CELLS_SCHEMA))
    return pa.concat_tables(parts) if parts else CELLS_SCHEMA.empty_table()


def crosspatch(
    pair: ModelPair | StagedPair,
    events: Sequence[DivergenceEvent],
    boundary: int | float | str | Sequence[int] | None = None,
    readouts: Sequence[str] = ("it",),
    batch_size: int = 16,
    check_noop: bool = True,
    headline: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    store: StateStore | None = None,
) -> pa.Table:
    """The whole cells table for `events`, sorted by prompt id, boundary and readout.

    With `check_noop` (default) the first batch is no-op checked; the report rides in the table's schema
    metadata (`engine.noop.noop_report(table)`), and a failed check raises `NoopCheckError`. `on_batch` as in
    `iter_crosspatch`: called after each batch (e.g. to stop a cancelled job there). A `StagedPair`
    (engine.staged) gives the same table in three phases, one model resident, its stored states in `store`.
    """
    from crosspatch.engine.staged import StagedPair, staged_cells

    if isinstance(pair, StagedPair):
        plan = cells_plan(pair, boundary, readouts, batch_size, headline)  # type: ignore[arg-type]
        return staged_cells(pair, events, plan, readouts, batch_size, check_noop, on_batch, store)
    reports: list[NoopReport] = []
    parts = list(
        iter_crosspatch(
            pair,
            events,
            boundary,
            readouts,
            batch_size,
            check_noop=check_noop,
            on_noop=reports.append,
            headline=headline,
            on_batch=on_batch,
        )
    )
    table = pa.concat_tables(parts) if parts else CELLS_SCHEMA.empty_table()
    table = table.sort_by([("prompt_id", "ascending"), ("boundary", "ascending"), ("readout", "ascending")])
    return attach(table, reports[0] if reports else None)
