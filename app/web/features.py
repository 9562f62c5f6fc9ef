"""The feature page's data: one small function the lead switches to `services.features.feature_page` once
that service merges (the dashboard renders only the `FeaturePage` contract, never the rows behind it)."""

from __future__ import annotations

import math

from crosspatch.app.schemas.features import FeatureExample, FeaturePage, GateCheck, HistogramBin
from crosspatch.app.services import results as results_service
from crosspatch.app.store.duckdb import ResultsStore

MAX_EVENTS = 10_000  # events read for one latent (the page paginates them)
HIST_BINS = 12


def feature_page(results: ResultsStore, dictionary_id: str, latent: int) -> FeaturePage:
    """The `FeaturePage` of `latent`, built from the API's own feature queries (`feature_acts` across
    events and `top_features`' per-feature scores), until `services.features.feature_page` lands."""
    rows = results_service.feature(results, dictionary_id, latent, None, MAX_EVENTS).data
    scores = results_service.top_features(
        results, dictionary_id=dictionary_id, limit=1000, include_failed_gate=True
    ).data  # per-feature scores of this dictionary, best first
    score = next((r for r in scores if r["latent"] == latent), None)
    fired = [r for r in rows if (r["act_itup"] or 0) > 0 or (r["act_ptup"] or 0) > 0]
    examples = [
        FeatureExample(
            pair_id=r["pair_id"],
            prompt_id=r["prompt_id"],
            split=r["split"],
            context_before=(r["prompt_text"] or "") + (r["prefix_text"] or ""),
            token=r["t_it_text"] or "",
            activation=r["act_itup"] or 0.0,
            activation_ptup=r["act_ptup"],
        )
        for r in sorted(fired, key=lambda r: (-(r["act_itup"] or 0.0), r["prompt_id"]))
    ]
    first = rows[0] if rows else {}
    gate = []
    if score is not None and score.get("gate_status"):
        gate.append(
            GateCheck(name="dictionary gate", status=score["gate_status"], detail=score.get("failed_checks"))
        )
    return FeaturePage(
        dictionary_id=dictionary_id,
        latent=latent,
        family=first.get("family") or (score or {}).get("family"),
        layer=first.get("layer") or (score or {}).get("layer"),
        n_events_active=len(fired),
        mean_act_itup=_mean([r["act_itup"] for r in rows]),
        mean_act_ptup=_mean([r["act_ptup"] for r in rows]),
        examples=examples,
        histogram=_histogram([e.activation for e in examples]),
        causal_drop=(score or {}).get("heldout_drop"),
        causal_drop_lo=(score or {}).get("heldout_ci_low"),
        causal_drop_hi=(score or {}).get("heldout_ci_high"),
        causal_n=(score or {}).get("heldout_n"),
        attribution=(score or {}).get("score"),
        gate=gate,
        gate_passed=None if score is None else score.get("gate_status") == "passed",
    )


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def _histogram(values: list[float], bins: int = HIST_BINS) -> list[HistogramBin]:
    """Equal-width bins over [min, max] of the activations where the latent fired."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [HistogramBin(lo=lo + i * width, hi=lo + (i + 1) * width, count=c) for i, c in enumerate(counts)]
