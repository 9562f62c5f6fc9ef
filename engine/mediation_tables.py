"""Arrow tables of a mediation run (FEATURE_ACTS_SCHEMA, FEATURE_EFFECTS_SCHEMA rows), apart from the method.

`per_event` keys are (mode, set kind, k or feature index, seed, statistic) tuples, e.g.
("ablate", "topk", 50, 0, "interaction_drop"); values are one float per test event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import FEATURE_ACTS_SCHEMA, FEATURE_EFFECTS_SCHEMA
from crosspatch.engine.stats import bootstrap_means

if TYPE_CHECKING:  # mediation.py imports this module
    from crosspatch.engine.controls import ControlStatus
    from crosspatch.engine.mediation import FeatureDictionary, FeatureRanking, MediationConfig


def acts_table(
    pair: ModelPair,
    batch: Sequence[DivergenceEvent],
    d: FeatureDictionary,
    a_ii: np.ndarray,
    a_pi: np.ndarray,
    split: str,
    attribution: np.ndarray | None = None,
) -> pa.Table:
    """feature_acts rows for latents active in either IT-late cell (`a_*`, `attribution`: `[batch, n_latents]`)."""
    rows, latents = np.nonzero((a_ii > 0) | (a_pi > 0))  # sparse: only active latents are stored
    n = len(rows)
    columns = {
        "family": [pair.family] * n,
        "pair_id": [pair.pair_id] * n,
        "prompt_id": [batch[r].prompt_id for r in rows.tolist()],
        "dictionary_id": [d.id] * n,
        "layer": np.full(n, d.layer, dtype=np.int32),
        "latent": latents.astype(np.int64),
        "act_ptup": a_pi[rows, latents].astype(np.float64),
        "act_itup": a_ii[rows, latents].astype(np.float64),
        "attribution": pa.nulls(n, pa.float64())
        if attribution is None
        else attribution[rows, latents].astype(np.float64),
        "split": [split] * n,
    }
    return pa.table(columns, schema=FEATURE_ACTS_SCHEMA)


def _ci(values: np.ndarray, cfg: MediationConfig) -> tuple[float, float, float]:
    """(mean, lo, hi) with the percentile bootstrap of the mean over events."""
    lo, hi = np.quantile(bootstrap_means(values, cfg.n_resamples, cfg.seed), [0.025, 0.975])
    return float(values.mean()), float(lo), float(hi)


def effects_table(
    pair: ModelPair,
    dictionaries: Sequence[FeatureDictionary],
    per_event: dict[tuple[str, str, int, int, str], list[float]],
    base: dict[str, list[float]],
    ranking: FeatureRanking,
    cfg: MediationConfig,
    status: dict[int, ControlStatus],
) -> pa.Table:
    """Set-level effects with bootstrap CIs (controls averaged over seeds per event), per-feature rows.

    Shares and rescue fractions are null where their denominator's CI covers 0; an unavailable
    matched-random control gets null rows with n = 0.
    """
    dict_ids = ",".join(d.id for d in dictionaries)
    layer_of = {d.id: d.layer for d in dictionaries}
    common = dict(family=pair.family, pair_id=pair.pair_id, dictionary_id=dict_ids, layer=None, latent=None)
    rows: list[dict] = []

    def row(intervention: str, k: int, statistic: str, effect, ci_low, ci_high, n: int, **feature) -> dict:
        """One row: set-level (`common`) unless `feature` names a dictionary_id, layer and latent."""
        return {**common, **feature, "intervention": intervention, "k": k, "statistic": statistic,
                "effect": effect, "ci_low": ci_low, "ci_high": ci_high, "n": n}  # fmt: skip

    i_full = np.array(base["interaction"])
    missing = np.array(base["missing_margin"])
    baseline = {"interaction": _ci(i_full, cfg), "missing_margin": _ci(missing, cfg)}
    # a ratio is reported only where its denominator is distinguishable from 0
    ratio_ok = {name: not (lo <= 0.0 <= hi) for name, (_, lo, hi) in baseline.items()}
    rank_of = {int(f): r for r, f in enumerate(np.argsort(-ranking.score, kind="stable"), start=1)}
    grouped: dict[tuple, list[np.ndarray]] = {}
    for (mode, name, k, _seed, stat), vals in per_event.items():
        grouped.setdefault((mode, name, k, stat), []).append(np.array(vals))
    for (mode, name, k, stat), runs in sorted(grouped.items()):
        x = np.mean(runs, axis=0)  # [n_test] average over control seeds
        if name == "single":
            dict_id, latent = ranking.keys[k]
            feature = dict(dictionary_id=dict_id, layer=layer_of[dict_id], latent=latent)
            rows.append(row("ablate_single", rank_of[k], stat, *_ci(x, cfg), len(x), **feature))
            continue
        denom_name = {"interaction_drop": "interaction", "rescue_gain": "missing_margin"}.get(stat)
        denom = {"interaction": i_full, "missing_margin": missing}.get(denom_name)
        cols = np.column_stack([x, denom]) if denom is not None else x[:, None]
        means = bootstrap_means(cols, cfg.n_resamples, cfg.seed)  # [R, 1 or 2]
        lo, hi = np.quantile(means[:, 0], [0.025, 0.975])
        intervention = f"{mode}_{name}"
        rows.append(row(intervention, k, stat, float(x.mean()), float(lo), float(hi), len(x)))
        if denom is not None:
            ratio_stat = "share" if stat == "interaction_drop" else "rescue_fraction"
            effect = rlo = rhi = None
            if ratio_ok[denom_name]:  # ratio of means
                rlo, rhi = (float(v) for v in np.quantile(means[:, 0] / means[:, 1], [0.025, 0.975]))
                effect = float(x.mean() / denom.mean())
            rows.append(row(intervention, k, ratio_stat, effect, rlo, rhi, len(x)))
    for k, st in sorted(status.items()):
        if st.available:
            continue
        for intervention, stats in (
            ("ablate_matched_random", ("interaction_drop", "share", "it_late_drop")),
            ("rescue_matched_random", ("rescue_gain", "rescue_fraction")),
        ):
            rows += [row(intervention, k, stat, None, None, None, 0) for stat in stats]
    for rank, f in enumerate(ranking.top(len(ranking.keys)), start=1):
        dict_id, latent = ranking.keys[f]
        feature = dict(dictionary_id=dict_id, layer=layer_of[dict_id], latent=latent)
        score = float(ranking.score[f])
        rows.append(
            row("attribution", rank, "attribution_score", score, None, None, ranking.n_events, **feature)
        )
    for name, (mean, lo, hi) in baseline.items():
        rows.append(row("baseline", 0, name, mean, lo, hi, len(i_full)))
    return pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA)
