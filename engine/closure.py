"""Structured boundary-state closure (method section 5.6): how much of the descendant-upstream gain a
low-rank part of the boundary shift restores, through IT's (the descendant's) late stack.

Split. Diverged events are split by prompt (seeded, `fit_fraction` to the train split, like mediation).
Fit. For every train event, the shift d = h_IT - h_PT of the residual entering block b at the scored (last)
position; the PCA directions are the right singular vectors of the train shifts `[n_fit, d_model]`,
uncentred (the mean shift is the signal a centred PCA would remove).
Inject. For a held-out event, v_r = the projection of its shift onto the top-r directions (the full delta
for rank 'full'), and the upstream state U = U_PT + alpha * v_r at the scored position (`positions='last'`,
the method's) or at every position with each position's own shift (`'all'`). Then
    closure = mean(Y(U, L_IT) - floor) / mean(native - floor),  floor = Y(U_PT, L_IT), native = Y(U_IT, L_IT)
(ratio of means over held-out events, CI from shared prompt resamples). alpha = 0 is the floor itself
(closure exactly 0); rank 'full', alpha = 1, `positions='all'` is U_IT, the native cell (closure 1).
Controls, at alpha = 1 per rank, each with the norm of v_r at every injected position and unable to draw
the signal: 'gaussian' (a fresh isotropic draw per event and position, projected off the top-K train
directions), 'random' (one fixed random unit direction off the top-K directions), with K = r (for 'full',
every direction the train shifts span); and 'sign_flip' (-v_r), which the method reports as strongly
negative. 'wrong_descendant' (method: "the wrong-descendant controls are nonzero, so the directions are not
recipe-unique"): the PCA directions fitted the same way on a second descendant's train shifts (h_B - h_PT,
the same base and train events), the event's whole shift projected on its top r (for 'full', all it spans),
injected into this descendant's hybrid; without a second descendant its rows are not valid, with the
reason. A rank the train split cannot support (r above its event count or the span of its shifts, or
above d_model) is a row with `valid` false and the reason, never a silent null.

Boundaries: one, a list or a sweep; each boundary is computed as a run of its own (same split, control
generator seeded afresh), so a sweep's rows equal the single-boundary runs'.
Forward work per boundary: 2 clean passes per batch of train events (the fit; 2 more with a second
descendant), then per batch of held-out events 2 clean passes, 1 late stack (the floor) and one IT late
stack per valid rank x nonzero alpha plus 3 per valid rank (controls; 4 with a second descendant): with the
default 6 ranks x 5 alphas, 24 + 18 late stacks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.control_schemas import CLOSURE_CELLS_SCHEMA, CLOSURE_SCHEMA, NO_SECOND_DESCENDANT
from crosspatch.engine.crosspatch import clean_passes, event_batches, late_stack_final, margin
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.pairs import ModelPair, check_readout, weights_fingerprint
from crosspatch.engine.recipe import ratio_of_means

FULL = "full"
DEFAULT_RANKS: tuple[int | str, ...] = (1, 4, 16, 64, 256, FULL)
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5)
ARMS: tuple[str, ...] = ("pca", "gaussian", "random", "sign_flip", "wrong_descendant")
POSITIONS: tuple[str, ...] = ("last", "all")


def split_fit_test(
    events: Sequence[DivergenceEvent], fit_fraction: float, seed: int
) -> tuple[list[DivergenceEvent], list[DivergenceEvent]]:
    """Seeded split of the diverged events by prompt: (train, held-out); either may be empty."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    scored = sorted((e for e in events if e.diverged), key=lambda e: e.prompt_id)
    order = list(range(len(scored)))
    random.Random(seed).shuffle(order)
    fit = {scored[i].prompt_id for i in order[: round(fit_fraction * len(scored))]}
    return [e for e in scored if e.prompt_id in fit], [e for e in scored if e.prompt_id not in fit]


@torch.no_grad()
def boundary_shifts(
    pair: ModelPair, events: Sequence[DivergenceEvent], boundary: int, batch_size: int = 16
) -> np.ndarray:
    """`[events, d_model]` float64 IT-minus-PT residual entering `boundary` at the scored position (prompt-id order)."""
    rows: dict[str, np.ndarray] = {}
    for batch, ids, mask, _ in event_batches(pair, events, batch_size):
        passes = clean_passes(pair, ids, mask, [boundary])  # 2 full forwards
        pt = passes.captured["pt"][boundary][:, -1].double().cpu()  # [batch, d_model]
        it = passes.captured["it"][boundary][:, -1].double().cpu()  # [batch, d_model]
        for e, d in zip(batch, (it - pt).numpy(), strict=True):
            rows[e.prompt_id] = d
    return np.stack([rows[k] for k in sorted(rows)]) if rows else np.zeros((0, pair.pt_adapter.d_model))


def pca_directions(shifts: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """`[r_avail, d_model]` uncentred principal directions of `[n, d_model]` shifts (singular values > tol x max)."""
    if shifts.shape[0] == 0:
        return np.zeros((0, shifts.shape[1]))
    _, s, vt = np.linalg.svd(shifts, full_matrices=False)
    keep = s > tol * s[0] if s[0] > 0 else np.zeros_like(s, dtype=bool)
    return vt[keep]


def _rank_reason(rank: int | str, n_fit: int, n_avail: int, d_model: int) -> str | None:
    """Why `rank` cannot be fitted (None when it can)."""
    if rank == FULL:
        return None
    if rank > d_model:
        return f"rank {rank} exceeds d_model {d_model}"
    if rank > n_fit:
        return f"rank {rank} needs at least {rank} train events; the fit split has {n_fit}"
    if rank > n_avail:
        return f"the {n_fit} train shifts span only {n_avail} directions, fewer than rank {rank}"
    return None


def _complement(directions: np.ndarray, d_model: int) -> np.ndarray:
    """`[d_model - K, d_model]` orthonormal basis of the complement of the K orthonormal `directions`."""
    if directions.shape[0] == 0:
        return np.eye(d_model)
    q, _ = np.linalg.qr(directions.T, mode="complete")  # [d_model, d_model]; first K columns span them
    return q[:, directions.shape[0] :].T


def _norm_match(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`raw` rescaled along the last axis to the norm of `like` (same shape `[..., d_model]`)."""
    scale = like.norm(dim=-1, keepdim=True) / raw.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return raw * scale


def check_ranks(ranks: Sequence[int | str]) -> list[int | str]:
    """The ranks as given; a rank that is neither a positive int nor 'full' is a ValueError."""
    bad = [r for r in ranks if not (r == FULL or (isinstance(r, int) and not isinstance(r, bool) and r >= 1))]
    if bad or not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct positive ints or 'full', got {list(ranks)}")
    return list(ranks)


def closure(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | float | str | Sequence[int] | None = None,
    readout: str = "it",
    ranks: Sequence[int | str] = DEFAULT_RANKS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    positions: str = "last",
    fit_fraction: float = 0.5,
    split_seed: int = 0,
    control_seed: int = 0,
    batch_size: int = 16,
    n_resamples: int = 2000,
    seed: int = 23,
    wrong_descendant: ModelPair | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(CLOSURE_CELLS_SCHEMA rows of the held-out events, CLOSURE_SCHEMA summary rows) at each boundary.

    `boundary`: one, a list or 'sweep' (`ModelPair.resolve_boundaries`); each boundary is run as on its own
    (same split, control draws seeded afresh), its rows carrying it. `wrong_descendant`: the base and a second
    descendant of it (its PT must be `pair`'s PT) for the wrong-descendant control.
    """
    check_readout(readout)
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ranks = check_ranks(ranks)
    alphas = sorted({float(a) for a in alphas})
    if not alphas:
        raise ValueError("alphas must name at least one injection scale")
    if wrong_descendant is not None and weights_fingerprint(wrong_descendant.pt) != weights_fingerprint(
        pair.pt
    ):
        raise ValueError(
            f"the wrong descendant's base ({wrong_descendant.pair_id}) is not {pair.pair_id}'s PT: "
            "the control needs a second descendant of the same base"
        )
    fit, test = split_fit_test(events, fit_fraction, split_seed)
    cells, summaries = [], []
    for b in pair.resolve_boundaries(boundary):
        c, s = _one_boundary(pair, fit, test, b, readout, ranks, alphas, positions, control_seed, batch_size,
                             n_resamples, seed, wrong_descendant)  # fmt: skip
        cells.append(c)
        summaries.append(s)
    return pa.concat_tables(cells), pa.concat_tables(summaries)


def _one_boundary(
    pair: ModelPair,
    fit: list[DivergenceEvent],
    test: list[DivergenceEvent],
    b: int,
    readout: str,
    ranks: list[int | str],
    alphas: list[float],
    positions: str,
    control_seed: int,
    batch_size: int,
    n_resamples: int,
    seed: int,
    wrong: ModelPair | None,
) -> tuple[pa.Table, pa.Table]:
    """Closure cells and summary at boundary `b` (the fit on `fit`, the scores on `test`)."""
    d_model = pair.pt_adapter.d_model
    dirs = pca_directions(boundary_shifts(pair, fit, b, batch_size))  # [n_avail, d_model]
    reasons = {("own", r): _rank_reason(r, len(fit), dirs.shape[0], d_model) for r in ranks}
    wrong_dirs = None
    if wrong is None:
        reasons |= {("wrong", r): NO_SECOND_DESCENDANT for r in ranks}
    else:
        wrong_dirs = pca_directions(boundary_shifts(wrong, fit, b, batch_size))  # [n_avail_b, d_model]
        reasons |= {("wrong", r): _rank_reason(r, len(fit), wrong_dirs.shape[0], d_model) for r in ranks}
    if not test:
        reasons = {key: f"the held-out split is empty ({len(fit)} train events)" for key in reasons}
    gen = torch.Generator().manual_seed(control_seed)
    bases: dict[int | str, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
    for r in (r for r in ranks if reasons[("own", r)] is None):
        top = dirs if r == FULL else dirs[:r]  # [K, d_model]
        comp = _complement(top, d_model)  # [d_model - K, d_model]
        w = None
        if comp.shape[0]:
            coeff = torch.randn(comp.shape[0], generator=gen, dtype=torch.float64)
            w = torch.from_numpy(comp).T @ coeff  # [d_model]
            w = w / w.norm()
        p = None if r == FULL else torch.from_numpy(dirs[:r])  # [r, d_model]
        bases[r] = (p, torch.from_numpy(comp) if comp.shape[0] else None, w)
    wrong_bases = {
        r: torch.from_numpy(wrong_dirs if r == FULL else wrong_dirs[:r])  # [r or n_avail_b, d_model]
        for r in ranks
        if wrong_dirs is not None and reasons[("wrong", r)] is None
    }
    rows = _held_out_rows(pair, test, b, readout, bases, wrong_bases, alphas, positions, gen, batch_size)
    cells = (
        pa.Table.from_pylist(rows, schema=CLOSURE_CELLS_SCHEMA)
        if rows
        else CLOSURE_CELLS_SCHEMA.empty_table()
    )
    summary = _summary(pair, cells, b, readout, ranks, alphas, positions, reasons, len(fit), len(test),
                       n_resamples, seed)  # fmt: skip
    return cells, summary


@torch.no_grad()
def _held_out_rows(
    pair: ModelPair,
    test: Sequence[DivergenceEvent],
    boundary: int,
    readout: str,
    bases: dict,
    wrong_bases: dict[int | str, torch.Tensor],
    alphas: Sequence[float],
    positions: str,
    gen: torch.Generator,
    batch_size: int,
) -> list[dict]:
    """Closure cells of the held-out events for every valid rank (`bases`), alpha and arm."""
    it = pair.adapter("it")
    score = it if readout in ("it", "own") else pair.adapter(readout)
    rows: list[dict] = []
    for batch, ids, mask, tokens in event_batches(pair, test, batch_size):
        passes = clean_passes(pair, ids, mask, [boundary])  # 2 full forwards
        u_pt = passes.captured["pt"][boundary]  # [batch, seq, d_model]
        u_it = passes.captured["it"][boundary].to(u_pt.device)  # [batch, seq, d_model]
        shift = (u_it - u_pt).double()  # [batch, seq, d_model]
        if positions == "last":
            shift = shift[:, -1:]  # [batch, 1, d_model]
        floor = margin(score, late_stack_final(pair, "pt", "it", passes, boundary), tokens)  # [batch]
        native = margin(score, passes.final["it"], tokens)  # [batch]

        def run(v: torch.Tensor, alpha: float, passes=passes, u_pt=u_pt, tokens=tokens) -> torch.Tensor:
            """`[batch]` Y(U_PT + alpha v, L_IT); v is `[batch, 1 or seq, d_model]` float64."""
            u = u_pt.clone()  # [batch, seq, d_model]
            add = (alpha * v).to(u.dtype).to(u.device)
            if positions == "last":
                u[:, -1:] = u[:, -1:] + add
            else:
                u = u + add
            final = it.run_layers(u, passes.contexts["it"], start=boundary)[0][:, -1]  # [batch, d_model]
            return margin(score, final, tokens)

        ys: list[tuple[str, int | str, float, torch.Tensor]] = []
        for r, (p, comp, w) in bases.items():
            dev = shift.device
            v = shift if p is None else (shift @ p.to(dev).T) @ p.to(dev)  # [batch, pos, d_model]
            for a in alphas:
                ys.append(("pca", r, a, floor if a == 0.0 else run(v, a)))
            if comp is not None:
                g = torch.randn(*v.shape[:-1], comp.shape[0], generator=gen, dtype=torch.float64) @ comp
                ys.append(("gaussian", r, 1.0, run(_norm_match(g.to(dev), v), 1.0)))
                ys.append(("random", r, 1.0, run(_norm_match(w.to(dev).expand_as(v), v), 1.0)))
            ys.append(("sign_flip", r, 1.0, run(-v, 1.0)))
        for r, q in wrong_bases.items():  # the event's whole shift projected on the other descendant's PCs
            q = q.to(shift.device)  # [r, d_model]
            ys.append(("wrong_descendant", r, 1.0, run((shift @ q.T) @ q, 1.0)))
        floor_np, native_np = floor.double().cpu().numpy(), native.double().cpu().numpy()  # [batch]
        for arm, r, a, y in ys:
            y_np = y.double().cpu().numpy()  # [batch]
            for i, e in enumerate(batch):
                rows.append({
                    "family": pair.family, "pair_id": pair.pair_id, "prompt_id": e.prompt_id,
                    "category": e.category, "position": e.position, "boundary": boundary, "readout": readout,
                    "arm": arm, "rank": pair.pt_adapter.d_model if r == FULL else r, "full_delta": r == FULL, "alpha": a,
                    "y_rescued": float(y_np[i]), "y_floor": float(floor_np[i]), "y_native": float(native_np[i]),
                })  # fmt: skip
    return rows


def _summary(
    pair: ModelPair,
    cells: pa.Table,
    boundary: int,
    readout: str,
    ranks: Sequence[int | str],
    alphas: Sequence[float],
    positions: str,
    reasons: dict,
    n_fit: int,
    n_test: int,
    n_resamples: int,
    seed: int,
) -> pa.Table:
    """One CLOSURE_SCHEMA row per arm x rank x alpha (controls at alpha 1), invalid ranks included."""
    keys = {"family": pair.family, "pair_id": pair.pair_id, "boundary": boundary, "readout": readout,
            "positions": positions, "n_fit": n_fit, "n_test": n_test}  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for row in cells.to_pylist():
        groups.setdefault((row["arm"], row["full_delta"], row["rank"], row["alpha"]), []).append(row)
    out = []
    for r in ranks:
        full = r == FULL
        rank = pair.pt_adapter.d_model if full else r
        plan = [("pca", a) for a in alphas] + [(arm, 1.0) for arm in ARMS[1:]]
        for arm, a in plan:
            row = {**keys, "arm": arm, "rank": rank, "full_delta": full, "alpha": a, "closure": None,
                   "ci_low": None, "ci_high": None, "rescued_gap": None, "native_gap": None}  # fmt: skip
            members = sorted(groups.get((arm, full, rank, a), []), key=lambda m: m["prompt_id"])
            reason = reasons[("wrong" if arm == "wrong_descendant" else "own", r)]
            if reason is None and not members:
                reason = (
                    f"no directions orthogonal to the top {rank} PCs in d_model {pair.pt_adapter.d_model}"
                )
            if reason is None:
                gain = np.array([m["y_rescued"] - m["y_floor"] for m in members])  # [events]
                gap = np.array([m["y_native"] - m["y_floor"] for m in members])  # [events]
                row |= {"rescued_gap": float(gain.mean()), "native_gap": float(gap.mean())}
                if gap.mean() == 0:
                    reason = "the native descendant-upstream gain (native - floor) is 0"
                else:
                    ratio = ratio_of_means(gain, gap, n_resamples, seed)
                    row |= {"closure": ratio.estimate, "ci_low": ratio.ci_low, "ci_high": ratio.ci_high}
            out.append(row | {"valid": reason is None, "reason": reason})
    return pa.Table.from_pylist(out, schema=CLOSURE_SCHEMA)
