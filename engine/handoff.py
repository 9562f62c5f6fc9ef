"""The handoff chain (method §5.4, §5.5): upstream state -> final-layer features -> IT-token margin.

Runs on mediation's held-out split with mediation's ranking and its selected top set S (the largest), reusing
its edits (`_ablate_edit`, `_rescue_edit`, hooks through `engine.hooks.mlp_hooks`) and `engine.controls`:

- **Gate** (§5.4): drop(c) = Y(c) - Y(c, S ablated) in the two IT-late cells at the late boundary b;
  gate = drop(IT up) - drop(PT up), on its own support: the events whose IT-late effect depends on upstream,
  i.e. whose interaction exceeds `gate_min_interaction` (default 0).
- **Rescue dose-response**: in (PT up, IT late), mlp_out += alpha (a_f(IT up) - a_f(current)) W_dec[S] for alpha
  in `alphas`; gain = Y' - Y(PT up, IT late), fraction = mean gain / mean missing margin (ratio of means).
  alpha = 0 must reproduce the unedited cell exactly: checked on every batch (CrosspatchError otherwise) and
  recorded (`alpha0_max_abs_diff`); controls are not run at alpha = 0 (the same no-op).
- **Window grafts** (§5.5): the terminal boundary t is the first dictionary layer. A window [start, stop) of
  blocks below t runs the donor model's MLPs on the host's own MLP inputs (hooks on the host's MLPs).
  Rescue: host PT upstream (blocks 0..t-1), donor IT, then IT's blocks t..L-1; change = Y(grafted) - Y(base).
  Degradation: host IT, donor PT; change = Y(base) - Y(grafted). `terminal_entry` swaps the whole residual
  entering t (the upper bound). mediated = change - change with S ablated (zero) in both passes;
  mediated fraction per prompt = mediated / total where |total| > `min_denominator`, then averaged.
- **Controls**: matched-random sets (mediation's pool, seeds and draws) and top-active noncausal sets on every
  analysis, same-delta random directions (the edit's norm, a random direction) on the grafts; top-active noncausal sets (the |S| latents with the highest mean fit-split activation among
  those with no positive fit score). `*_excess` rows = top set minus control, paired per event.

Default windows, scaled to depth L from the method's Llama/Qwen tables (r(x) = floor(x + 0.5)):
early [0, r(0.4 L)), mid [r(0.3 L), r(0.7 L)), late_preterminal [b, t), midlate_preterminal [r(0.3 L), t),
terminal_entry; each MLP window is clipped to [0, t) and dropped when empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.controls import control_pool, matched_random, matched_status, random_directions
from crosspatch.engine.crosspatch import (
    CELLS,
    CleanPasses,
    clean_passes,
    crosspatch_batch,
    event_batches,
    margin,
)
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.hooks import MlpHook, mlp_hooks
from crosspatch.engine.mediation import (
    Edit,
    FeatureDictionary,
    FeatureRanking,
    MediationConfig,
    _ablate_edit,
    _by_layer,
    _capture_mlp,
    _dict_acts,
    _rescue_edit,
    it_late_margin,
    mlp_edits,
)
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import FEATURE_ACTS_SCHEMA, FEATURE_UPSTREAM_SCHEMA, HANDOFF_SCHEMA
from crosspatch.engine.stats import Z95, bootstrap_means, family_balanced

CONTROL_KINDS = ("matched_random", "same_delta_random", "top_active_noncausal")
GRAFT_ONLY = ("same_delta_random",)  # the gate and the dose-response use the other two controls (§5.4)
TERMINAL_ENTRY = "terminal_entry"


@dataclass
class HandoffConfig:
    """Knobs of the handoff analyses (`MediationConfig.handoff`; None = not run)."""

    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    gate_min_interaction: float = 0.0  # gate support: events with interaction > this
    min_denominator: float = 0.05  # per-prompt mediated fraction only where |total change| > this
    # name -> (start, stop) MLP blocks to graft; None = the method's windows scaled to L
    windows: dict[str, tuple[int, int]] | None = None

    def validate(self) -> None:
        if not self.alphas or 0.0 not in self.alphas:
            raise CrosspatchError(f"alphas {self.alphas} must include 0 (the exactness check)")
        if self.min_denominator <= 0 or not math.isfinite(self.min_denominator):
            raise CrosspatchError(f"min_denominator {self.min_denominator} must be a positive number")
        for name, (start, stop) in (self.windows or {}).items():
            if not 0 <= start < stop:
                raise CrosspatchError(f"window {name!r} = [{start}, {stop}) must satisfy 0 <= start < stop")


def _r(x: float) -> int:
    return math.floor(x + 0.5)


def default_windows(n_layers: int, boundary: int, terminal: int) -> dict[str, tuple[int, int]]:
    """The method's MLP windows scaled to depth `n_layers`, clipped to [0, terminal); empty ones dropped."""
    raw = {
        "early": (0, _r(0.4 * n_layers)),
        "mid": (_r(0.3 * n_layers), _r(0.7 * n_layers)),
        "late_preterminal": (boundary, terminal),
        "midlate_preterminal": (_r(0.3 * n_layers), terminal),
    }
    clipped = {name: (max(0, a), min(b, terminal)) for name, (a, b) in raw.items()}
    return {name: (a, b) for name, (a, b) in clipped.items() if a < b}


def top_active_noncausal(ranking: FeatureRanking, size: int) -> list[int]:
    """The `size` most active latents (mean fit-split activation, both IT-late cells) with no positive score."""
    index = {key: i for i, key in enumerate(ranking.keys)}
    mean_act = np.zeros(len(ranking.keys))
    for t in ranking.acts:
        for d, lat, a, b in zip(
            t["dictionary_id"].to_pylist(),
            t["latent"].to_pylist(),
            t["act_itup"].to_pylist(),
            t["act_ptup"].to_pylist(),
            strict=True,
        ):
            mean_act[index[(d, lat)]] += a + b
    key = mean_act if mean_act.any() else ranking.active_rate  # without recorded acts: the firing rate
    eligible = [i for i in np.argsort(-key, kind="stable") if ranking.score[i] <= 0 and key[i] > 0]
    return [int(i) for i in eligible[:size]]


@dataclass
class HandoffResult:
    """The handoff table and what the run decided: windows, control sets and their availability."""

    table: pa.Table  # HANDOFF_SCHEMA, level 'pair'
    windows: dict[str, tuple[int, int] | None]
    boundary: int
    terminal: int
    alpha0_max_abs_diff: float
    sets: dict[tuple[str, int], list[tuple[str, int]]] = field(
        default_factory=dict
    )  # (kind, seed) -> features
    unavailable: dict[str, str] = field(default_factory=dict)  # control kind -> reason


def _grafted_upstream(
    pair: ModelPair,
    host: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    passes: CleanPasses,
    window: tuple[int, int],
    terminal: int,
) -> torch.Tensor:
    """`[batch, seq, d_model]` residual entering `terminal` when `host` runs blocks 0..t-1 with the other's MLPs in `window`."""
    adapter = pair.adapter(host)  # type: ignore[arg-type]
    donor = pair.adapter("pt" if host == "it" else "it")

    def graft(layer: int) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return donor.mlp(layer)(x)  # [batch, seq, d_model]: the donor's MLP on the host's input

        return fn

    resid = adapter.embed(ids, positions_from_mask(mask))  # [batch, seq, d_model]
    with mlp_hooks(adapter, {layer: graft(layer) for layer in range(*window)}):
        return adapter.run_layers(resid, passes.contexts[host], start=0, stop=terminal)[0]


def _late(
    pair: ModelPair,
    resid: torch.Tensor,
    passes: CleanPasses,
    start: int,
    tokens: torch.Tensor,
    edits: dict[int, Edit],
) -> torch.Tensor:
    """`[batch]` Y of IT's blocks start..L-1 on `resid` with `edits` (common-IT readout)."""
    with mlp_edits(pair, edits):
        final = pair.it_adapter.run_layers(resid, passes.contexts["it"], start=start)[0][:, -1]  # [batch, d]
    return margin(pair.it_adapter, final, tokens)


@torch.no_grad()
def run_handoff(
    pair: ModelPair,
    test: Sequence[DivergenceEvent],
    dictionaries: Sequence[FeatureDictionary],
    ranking: FeatureRanking,
    selected: Sequence[int],
    cfg: MediationConfig,
    hcfg: HandoffConfig,
    on_progress: Callable[[str], None] | None = None,
) -> HandoffResult:
    """Gate, rescue dose-response and window grafts for the set `selected` (global feature indices) on `test`."""
    hcfg.validate()
    b = pair.resolve_boundaries(cfg.boundary)[0]
    t = min(d.layer for d in dictionaries)
    if t < 1:
        raise CrosspatchError("the handoff needs dictionaries above block 0 (nothing is upstream of them)")
    windows: dict[str, tuple[int, int] | None] = dict(hcfg.windows or default_windows(pair.n_layers, b, t))
    for name, (start, stop) in list(windows.items()):  # type: ignore[misc]
        if stop > t:
            raise CrosspatchError(f"window {name!r} = [{start}, {stop}) reaches the terminal boundary {t}")
    windows[TERMINAL_ENTRY] = None
    k = len(selected)
    if k == 0:
        raise CrosspatchError("the handoff needs a non-empty selected feature set")
    seeds = list(range(cfg.n_random_seeds))
    # (kind, seed) -> (features, same-delta seed or None)
    runs: dict[tuple[str, int], tuple[list[int], int | None]] = {("topk", 0): (list(selected), None)}
    unavailable: dict[str, str] = {}
    pool = control_pool(ranking.keys, ranking.score, ranking.active_rate, selected)
    status = matched_status(ranking.keys, selected, pool, cfg.neighbours, k)
    if status.available:
        match_key = ranking.active_rate * np.abs(ranking.score)
        for s in seeds:  # mediation's seeds: the same draws as its matched-random rows
            runs[("matched_random", s)] = (
                matched_random(ranking.keys, match_key, selected, pool, 1000 * k + s, cfg.neighbours),
                None,
            )
    else:
        unavailable["matched_random"] = status.reason
    for s in seeds:
        runs[("same_delta_random", s)] = (list(selected), 7919 * k + s)
    active = top_active_noncausal(ranking, k)
    if len(active) == k:
        runs[("top_active_noncausal", 0)] = (active, None)
    else:
        unavailable["top_active_noncausal"] = (
            f"only {len(active)} active latents without a positive score, need {k}"
        )
    layers = sorted({d.layer for d in dictionaries})
    d_model = pair.it_adapter.d_model
    # (analysis, window-or-alpha, kind, seed, statistic) -> per-event values
    per: dict[tuple, list[float]] = {}

    def add(key: tuple, values: torch.Tensor) -> None:
        per.setdefault(key, []).extend(values.tolist())

    alpha0s: list[float] = []  # per batch: max |gain| of the top set at alpha = 0
    n_done = 0
    for batch, ids, mask, tokens in event_batches(pair, test, cfg.batch_size):
        passes = clean_passes(pair, ids, mask, sorted({b, t}))
        cells = crosspatch_batch(pair, ids, mask, tokens[:, 1], tokens[:, 0], [b], ("it",), passes)[(b, "it")]
        y = {cell: cells[column] for cell, column in CELLS.items()}  # (upstream, late) -> [batch]
        interaction = (y["it", "it"] - y["it", "pt"]) - (y["pt", "it"] - y["pt", "pt"])
        add(("base", None, "none", 0, "interaction"), interaction)
        add(("base", None, "none", 0, "missing_margin"), y["it", "it"] - y["pt", "it"])
        acts_ii = _dict_acts(
            _capture_mlp(pair, "it", passes, b, tokens, layers, with_grad=False)[0], dictionaries
        )
        prompt_ids = [e.prompt_id for e in batch]
        # the terminal-boundary bases and the grafted upstreams, shared by every set
        y_pi_t = _late(pair, passes.captured["pt"][t], passes, t, tokens, {})
        upstream = {("rescue", TERMINAL_ENTRY): passes.captured["it"][t]}
        upstream.update({("degrade", TERMINAL_ENTRY): passes.captured["pt"][t]})
        for name, window in windows.items():
            if window is not None:
                upstream[("rescue", name)] = _grafted_upstream(pair, "pt", ids, mask, passes, window, t)
                upstream[("degrade", name)] = _grafted_upstream(pair, "it", ids, mask, passes, window, t)
        y_graft = {
            key: y_pi_t
            if key[0] == "rescue" and torch.equal(resid, passes.captured["pt"][t])
            else y["it", "it"]
            if key[0] == "degrade" and torch.equal(resid, passes.captured["it"][t])
            else _late(pair, resid, passes, t, tokens, {})
            for key, resid in upstream.items()
        }
        for (direction, name), yg in y_graft.items():
            change = yg - y_pi_t if direction == "rescue" else y["it", "it"] - yg
            add((f"{direction}_graft", name, "none", 0, "total"), change)
        for (kind, s), (features, sd) in runs.items():
            groups = _by_layer(features, ranking, dictionaries)
            dirs = None if sd is None else {L: random_directions(prompt_ids, sd, L, d_model) for L in groups}
            ablate = {L: _ablate_edit(groups, None, dirs) for L in groups}
            if kind not in GRAFT_ONLY:
                _gate_and_dose(
                    pair, passes, b, tokens, y, groups, acts_ii, ablate, dirs, kind, s, hcfg, add, alpha0s
                )
            # window grafts: the change with S ablated in both passes (an unchanged upstream changes nothing)
            base_abl = {
                "rescue": _late(pair, passes.captured["pt"][t], passes, t, tokens, ablate),
                "degrade": _late(pair, passes.captured["it"][t], passes, t, tokens, ablate),
            }
            for (direction, name), resid in upstream.items():
                base_resid = passes.captured["pt" if direction == "rescue" else "it"][t]
                unchanged = torch.equal(resid, base_resid)
                yg_abl = base_abl[direction] if unchanged else _late(pair, resid, passes, t, tokens, ablate)
                if direction == "rescue":
                    total, total_abl = y_graft[direction, name] - y_pi_t, yg_abl - base_abl[direction]
                else:
                    total, total_abl = y["it", "it"] - y_graft[direction, name], base_abl[direction] - yg_abl
                add((f"{direction}_graft", name, kind, s, "mediated"), total - total_abl)
        alpha0 = max(alpha0s, default=0.0)
        if alpha0 != 0.0:
            raise CrosspatchError(
                f"rescue at alpha=0 moved Y(PT up, IT late) by up to {alpha0:.3g}: the edit is not a no-op"
            )
        n_done += len(batch)
        if on_progress:
            on_progress(f"handoff on {n_done}/{len(test)} test events")
    table = _table(pair, dictionaries, per, runs, unavailable, windows, b, t, k, cfg, hcfg, alpha0)
    return HandoffResult(
        table=table,
        windows=windows,
        boundary=b,
        terminal=t,
        alpha0_max_abs_diff=alpha0,
        sets={key: [ranking.keys[f] for f in feats] for key, (feats, _) in runs.items()},
        unavailable=unavailable,
    )


def _gate_and_dose(
    pair: ModelPair,
    passes: CleanPasses,
    b: int,
    tokens: torch.Tensor,
    y: dict[tuple[str, str], torch.Tensor],
    groups: dict,
    acts_ii: dict[int, dict[str, torch.Tensor]],
    ablate: dict[int, Edit],
    dirs: dict[int, torch.Tensor] | None,
    kind: str,
    s: int,
    hcfg: HandoffConfig,
    add: Callable[[tuple, torch.Tensor], None],
    alpha0s: list[float],
) -> None:
    """One set's gate drops and rescue gains over alpha at the late boundary b (per-event values via `add`)."""
    drop_ii = y["it", "it"] - it_late_margin(pair, "it", passes, b, tokens, ablate)  # [batch]
    drop_pi = y["pt", "it"] - it_late_margin(pair, "pt", passes, b, tokens, ablate)  # [batch]
    add(("gate", None, kind, s, "drop_itup"), drop_ii)
    add(("gate", None, kind, s, "drop_ptup"), drop_pi)
    add(("gate", None, kind, s, "gate"), drop_ii - drop_pi)
    for alpha in hcfg.alphas:
        if alpha == 0.0 and kind != "topk":
            continue  # alpha 0 is the exactness check, run once on the top set
        edits = {L: _rescue_edit(groups, acts_ii, alpha, dirs) for L in groups}
        gain = it_late_margin(pair, "pt", passes, b, tokens, edits) - y["pt", "it"]  # [batch]
        if alpha == 0.0:
            alpha0s.append(float(gain.abs().max()))
        add(("dose", alpha, kind, s, "rescue_gain"), gain)


def _mean_ci(x: np.ndarray, cfg: MediationConfig) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) percentile bootstrap over events; all None for an empty sample."""
    if len(x) == 0:
        return None, None, None
    lo, hi = np.quantile(bootstrap_means(x, cfg.n_resamples, cfg.seed), [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def _table(
    pair: ModelPair,
    dictionaries: Sequence[FeatureDictionary],
    per: dict[tuple, list[float]],
    runs: dict[tuple[str, int], tuple[list[int], int | None]],
    unavailable: dict[str, str],
    windows: dict[str, tuple[int, int] | None],
    b: int,
    t: int,
    k: int,
    cfg: MediationConfig,
    hcfg: HandoffConfig,
    alpha0: float,
) -> pa.Table:
    """Pair-level HANDOFF_SCHEMA rows: seeds averaged per event, then bootstrap CIs over events."""
    common = dict(
        family=pair.family,
        pair_id=pair.pair_id,
        dictionary_id=",".join(d.id for d in dictionaries),
        level="pair",
    )
    rows: list[dict] = []

    def row(
        analysis: str, where: object, kind: str, stat: str, stats: tuple, n: int, size: int | None = k
    ) -> None:
        window = where if isinstance(where, str) else None
        span = windows.get(window) if window else None
        rows.append(
            dict(
                common,
                analysis=analysis,
                window_name=window,
                window_start=span[0] if span else None,
                window_stop=span[1] if span else (t if window == TERMINAL_ENTRY else None),
                boundary=t if analysis.endswith("_graft") else b,
                alpha=where if analysis == "dose" else None,
                set_kind=kind,
                k=size,
                statistic=stat,
                effect=stats[0],
                ci_low=stats[1],
                ci_high=stats[2],
                n=n,
            )
        )

    def values(analysis: str, where: object, kind: str, stat: str) -> np.ndarray | None:
        seeds = [
            np.array(v)
            for (a, w, kd, _s, st), v in per.items()
            if (a, w, kd, st) == (analysis, where, kind, stat)
        ]
        return np.mean(seeds, axis=0) if seeds else None  # [n_events]

    interaction = np.array(per[("base", None, "none", 0, "interaction")])
    missing = np.array(per[("base", None, "none", 0, "missing_margin")])
    support = interaction > hcfg.gate_min_interaction  # [n_events]
    n_all = len(interaction)
    kinds = ["topk", *CONTROL_KINDS]
    gate_kinds = [kd for kd in kinds if kd not in GRAFT_ONLY]
    # gate on its own support
    row("gate", None, "none", "interaction", _mean_ci(interaction[support], cfg), int(support.sum()), None)
    row("gate", None, "none", "support_fraction", (float(support.mean()), None, None), n_all, None)
    top_gate = values("gate", None, "topk", "gate")
    for kind in gate_kinds:
        if kind in unavailable:
            for stat in ("gate", "drop_itup", "drop_ptup", "gate_excess"):
                row("gate", None, kind, stat, (None, None, None), 0)
            continue
        for stat in ("gate", "drop_itup", "drop_ptup"):
            x = values("gate", None, kind, stat)[support]  # type: ignore[index]
            row("gate", None, kind, stat, _mean_ci(x, cfg), len(x))
        if kind != "topk":
            x = (top_gate - values("gate", None, kind, "gate"))[support]  # type: ignore[operator]
            row("gate", None, kind, "gate_excess", _mean_ci(x, cfg), len(x))
    # rescue dose-response: gain, fraction (ratio of means; null when the missing margin's CI covers 0)
    missing_stats = _mean_ci(missing, cfg)
    row("dose", None, "none", "missing_margin", missing_stats, n_all, None)
    ratio_ok = not (missing_stats[1] <= 0.0 <= missing_stats[2])  # type: ignore[operator]
    for alpha in hcfg.alphas:
        top_gain = values("dose", alpha, "topk", "rescue_gain")
        for kind in gate_kinds if alpha != 0.0 else ["topk"]:
            if kind in unavailable:
                for stat in ("rescue_gain", "rescue_fraction", "gain_excess"):
                    row("dose", alpha, kind, stat, (None, None, None), 0)
                continue
            gain = values("dose", alpha, kind, "rescue_gain")
            means = bootstrap_means(np.column_stack([gain, missing]), cfg.n_resamples, cfg.seed)  # [R, 2]
            lo, hi = np.quantile(means[:, 0], [0.025, 0.975])
            row("dose", alpha, kind, "rescue_gain", (float(gain.mean()), float(lo), float(hi)), n_all)  # type: ignore[union-attr]
            frac = (None, None, None)
            if ratio_ok:
                flo, fhi = np.quantile(means[:, 0] / means[:, 1], [0.025, 0.975])
                frac = (float(gain.mean() / missing.mean()), float(flo), float(fhi))  # type: ignore[union-attr]
            row("dose", alpha, kind, "rescue_fraction", frac, n_all)
            if kind != "topk":
                row("dose", alpha, kind, "gain_excess", _mean_ci(top_gain - gain, cfg), n_all)  # type: ignore[operator]
    row("dose", 0.0, "topk", "alpha0_max_abs_diff", (alpha0, None, None), n_all)
    # window grafts: total, mediated, per-prompt mediated fraction (finite denominators only)
    for analysis in ("rescue_graft", "degrade_graft"):
        for name in windows:
            total = values(analysis, name, "none", "total")
            row(analysis, name, "none", "total", _mean_ci(total, cfg), n_all, None)  # type: ignore[arg-type]
            finite = np.abs(total) > hcfg.min_denominator  # type: ignore[arg-type]
            top_med = values(analysis, name, "topk", "mediated")
            for kind in kinds:
                if kind in unavailable:
                    for stat in ("mediated", "mediated_fraction", "mediated_excess"):
                        row(analysis, name, kind, stat, (None, None, None), 0)
                    continue
                med = values(analysis, name, kind, "mediated")
                row(analysis, name, kind, "mediated", _mean_ci(med, cfg), n_all)  # type: ignore[arg-type]
                frac = med[finite] / total[finite]  # type: ignore[index]
                row(analysis, name, kind, "mediated_fraction", _mean_ci(frac, cfg), int(finite.sum()))
                if kind != "topk":
                    row(analysis, name, kind, "mediated_excess", _mean_ci(top_med - med, cfg), n_all)  # type: ignore[operator]
    return pa.Table.from_pylist(rows, schema=HANDOFF_SCHEMA)


_GROUP = ("analysis", "window_name", "window_start", "window_stop", "alpha", "set_kind", "statistic")


def handoff_balanced(table: pa.Table) -> pa.Table:
    """Add family rows (unweighted mean of the family's pairs) and balanced rows (of families), as engine.stats does."""
    pair_rows = [r for r in table.to_pylist() if r["level"] == "pair"]
    out = list(table.to_pylist())

    def combine(group: list[dict]) -> tuple[float | None, float | None, float | None]:
        ok = [r for r in group if r["effect"] is not None and r["ci_low"] is not None]
        if not ok:
            return None, None, None
        return family_balanced([(r["effect"], r["ci_low"], r["ci_high"]) for r in ok])

    def pooled(key: Sequence[object], family: str | None, level: str, group: list[dict]) -> dict:
        """One pooled row of `group` (a family's pairs, or the families)."""
        mean, lo, hi = combine(group)  # within a family: SE = sqrt(sum se^2) / m, as engine.stats
        return dict(
            zip(_GROUP, key, strict=True),
            family=family,
            pair_id=None,
            dictionary_id=None,
            level=level,
            boundary=None,
            k=None,
            effect=mean,
            ci_low=lo,
            ci_high=hi,
            n=sum(r["n"] for r in group),
        )

    by_family: dict[tuple, list[dict]] = {}
    for r in pair_rows:
        by_family.setdefault((r["family"], *(r[c] for c in _GROUP)), []).append(r)
    fam_rows = [pooled(key, family, "family", group) for (family, *key), group in by_family.items()]
    by_key: dict[tuple, list[dict]] = {}
    for r in fam_rows:
        by_key.setdefault(tuple(r[c] for c in _GROUP), []).append(r)
    out += [pooled(key, None, "balanced", group) for key, group in by_key.items()]
    return pa.Table.from_pylist(out + fam_rows, schema=HANDOFF_SCHEMA)


def feature_upstream_table(feature_acts: pa.Table, n_events: dict[tuple[str, str], int]) -> pa.Table:
    """Per (pair, dictionary, latent, split): mean activation under IT vs PT upstream in the IT late stack.

    `feature_acts` stores active latents only, so a missing event counts as (0, 0); `n_events` gives the
    number of events per (pair_id, split). CI: normal approximation of the mean paired difference.
    """
    assert feature_acts.schema.equals(FEATURE_ACTS_SCHEMA, check_metadata=False)
    acc: dict[tuple, list[float]] = {}  # key -> [sum itup, sum ptup, sum d, sum d^2]
    meta: dict[tuple, tuple[str, int]] = {}
    cols = [
        feature_acts[c].to_pylist()
        for c in ("family", "pair_id", "dictionary_id", "layer", "latent", "split")
    ]
    for fam, pid, did, layer, lat, split, ai, ap in zip(
        *cols, feature_acts["act_itup"].to_pylist(), feature_acts["act_ptup"].to_pylist(), strict=True
    ):
        key = (pid, did, lat, split)
        s = acc.setdefault(key, [0.0, 0.0, 0.0, 0.0])
        d = ai - ap
        s[0] += ai
        s[1] += ap
        s[2] += d
        s[3] += d * d
        meta[key] = (fam, layer)
    rows = []
    for (pid, did, lat, split), (si, sp, sd, sd2) in sorted(acc.items()):
        n = n_events.get((pid, split))
        if not n:
            raise CrosspatchError(f"no event count for pair {pid!r} split {split!r}")
        mean = sd / n
        var = max(sd2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
        half = Z95 * math.sqrt(var / n)
        fam, layer = meta[(pid, did, lat, split)]
        rows.append(
            dict(
                family=fam,
                pair_id=pid,
                dictionary_id=did,
                layer=layer,
                latent=lat,
                split=split,
                mean_act_itup=si / n,
                mean_act_ptup=sp / n,
                diff=mean,
                ci_low=mean - half,
                ci_high=mean + half,
                n=n,
            )
        )
    return pa.Table.from_pylist(rows, schema=FEATURE_UPSTREAM_SCHEMA)
