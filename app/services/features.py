"""Feature pages: one latent's top events, activation histogram, causal drop, logit-lens tokens and gate.

`feature_page(source, dictionary_id, latent)` reads only the results DuckDB (`ResultsStore`, or a DuckDB
connection / cursor on a results file, e.g. the dashboard's), from the tables mediation writes:
`feature_acts` (histogram, means), `feature_examples` (decoded top events), `feature_scores` (held-out
single-feature ablation drop with CI, fit-split attribution), `feature_decoder_tokens` (logit lens, PT
decoder share) and `gate_checks`. Automatic labels come only from a registered `FeatureLabeller`; none
is registered by default.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import duckdb

from crosspatch.app.errors import Invalid, NotFound
from crosspatch.app.schemas.features import FeatureExample, FeaturePage, GateCheck, HistogramBin, LogitToken
from crosspatch.app.store.duckdb import ResultsStore

N_EXAMPLES = 10
N_BINS = 20


class FeatureLabeller(Protocol):
    """Something that names a feature from its page (autointerp, a lookup table); None = no label."""

    def label(self, page: FeaturePage) -> str | None: ...


LABELLERS: dict[str, FeatureLabeller] = {}


def register_labeller(name: str, labeller: FeatureLabeller) -> None:
    """Make `labeller` available to feature pages as `name`; a second registration of a name raises."""
    if name in LABELLERS:
        raise ValueError(f"feature labeller {name!r} is already registered")
    LABELLERS[name] = labeller


def _rows(cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return cur.sql(sql, params=params).to_arrow_table().to_pylist()


def _histogram(values: list[float], n_bins: int) -> list[HistogramBin]:
    """`n_bins` equal-width bins from min to max of `values` (the last bin closed)."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [HistogramBin(lo=lo, hi=hi, count=len(values))]
    width = (hi - lo) / n_bins
    counts = [0] * n_bins
    for v in values:
        counts[min(int((v - lo) / width), n_bins - 1)] += 1
    return [HistogramBin(lo=lo + i * width, hi=lo + (i + 1) * width, count=c) for i, c in enumerate(counts)]


_DETAIL = re.compile(r"^(\w+) \((.*?)\):\s?(.*)$", re.S)


def _gate(rows: list[dict[str, Any]]) -> tuple[list[GateCheck], bool | None]:
    """One GateCheck per check name (the latest job's row), and whether every recorded row passed."""
    seen: dict[str, GateCheck] = {}
    for r in rows:  # ordered latest job first
        if r["check_name"] in seen:
            continue
        m = _DETAIL.match(r["detail"] or "")
        status, threshold, detail = m.groups() if m else (None, None, r["detail"])
        seen[r["check_name"]] = GateCheck(
            name=r["check_name"],
            value=r["value"],
            threshold=threshold if r["threshold"] is None else str(r["threshold"]),
            passed=r["passed"],
            status=status or ("passed" if r["passed"] else "failed"),
            detail=detail or None,
        )
    return list(seen.values()), (all(bool(r["passed"]) for r in rows) if rows else None)


def _page(
    cur: duckdb.DuckDBPyConnection,
    dictionary_id: str,
    latent: int,
    family: str | None,
    n_examples: int,
    n_bins: int,
) -> FeaturePage:
    key = [dictionary_id, latent, family, family]
    where = "dictionary_id = ? AND latent = ? AND (? IS NULL OR family = ?)"
    acts = _rows(cur, f"SELECT family, layer, act_itup, act_ptup FROM feature_acts WHERE {where}", key)
    tokens = _rows(
        cur,
        f"""SELECT family, layer, architecture, branch, direction, rank, token, value, pt_decoder_share
            FROM feature_decoder_tokens
            WHERE {where} AND job_id = (SELECT max(job_id) FROM feature_decoder_tokens WHERE {where})
            ORDER BY direction, rank""",
        key + key,
    )
    scores = _rows(
        cur,
        f"""SELECT family, layer, score, heldout_drop, heldout_ci_low, heldout_ci_high, heldout_n
            FROM feature_scores WHERE {where} ORDER BY heldout_n DESC NULLS LAST LIMIT 1""",
        key,
    )
    if not (acts or tokens or scores):
        scope = f" in family {family!r}" if family else ""
        raise NotFound(f"no results for latent {latent} of dictionary {dictionary_id!r}{scope}")
    examples = _rows(
        cur,
        f"""SELECT pair_id, prompt_id, split, context_before, token, context_after, activation, activation_ptup
            FROM feature_examples WHERE {where}
            ORDER BY activation DESC, prompt_id LIMIT ?""",
        [*key, n_examples],
    )
    gate_rows = _rows(
        cur,
        "SELECT check_name, value, threshold, passed, detail FROM gate_checks WHERE dictionary_id = ? "
        "AND (? IS NULL OR family = ?) ORDER BY job_id DESC, check_name",
        [dictionary_id, family, family],
    )
    gate, gate_passed = _gate(gate_rows)
    first = (acts or tokens or scores)[0]
    fired = [r for r in acts if (r["act_itup"] or 0) > 0 or (r["act_ptup"] or 0) > 0]
    itup = [r["act_itup"] for r in fired if r["act_itup"] is not None]
    ptup = [r["act_ptup"] for r in fired if r["act_ptup"] is not None]
    s = scores[0] if scores else {}
    return FeaturePage(
        dictionary_id=dictionary_id,
        latent=latent,
        family=first["family"],
        layer=first["layer"],
        architecture=tokens[0]["architecture"] if tokens else None,
        branch=tokens[0]["branch"] if tokens else None,
        n_events_active=len(fired),
        mean_act_itup=sum(itup) / len(itup) if itup else None,
        mean_act_ptup=sum(ptup) / len(ptup) if ptup else None,
        examples=[FeatureExample(**r) for r in examples],
        histogram=_histogram([v for v in itup if v > 0], n_bins),
        causal_drop=s.get("heldout_drop"),
        causal_drop_lo=s.get("heldout_ci_low"),
        causal_drop_hi=s.get("heldout_ci_high"),
        causal_n=s.get("heldout_n"),
        attribution=s.get("score"),
        decoder_top_tokens=[
            LogitToken(token=r["token"], value=r["value"]) for r in tokens if r["direction"] == "top"
        ],
        decoder_bottom_tokens=[
            LogitToken(token=r["token"], value=r["value"]) for r in tokens if r["direction"] == "bottom"
        ],
        pt_decoder_share=tokens[0]["pt_decoder_share"] if tokens else None,
        gate=gate,
        gate_passed=gate_passed,
    )


def feature_page(
    source: ResultsStore | duckdb.DuckDBPyConnection,
    dictionary_id: str,
    latent: int,
    family: str | None = None,
    *,
    n_examples: int = N_EXAMPLES,
    n_bins: int = N_BINS,
    labeller: str | None = None,
) -> FeaturePage:
    """The feature page of `latent` in `dictionary_id` (NotFound when no job stored anything for it).

    `source` is the service's `ResultsStore` or any DuckDB connection on a results file; `labeller` names a
    registered `FeatureLabeller` (default: no label).
    """
    if n_examples < 1 or n_bins < 1:
        raise Invalid(f"n_examples and n_bins must be >= 1, got {n_examples}, {n_bins}")
    if labeller is not None and labeller not in LABELLERS:
        valid = ", ".join(sorted(LABELLERS)) or "none registered"
        raise Invalid(f"unknown feature labeller {labeller!r}; valid: {valid}")
    if isinstance(source, ResultsStore):
        with source.cursor() as cur:
            page = _page(cur, dictionary_id, latent, family, n_examples, n_bins)
    else:
        page = _page(source.cursor(), dictionary_id, latent, family, n_examples, n_bins)
    if labeller is not None:
        page.label = LABELLERS[labeller].label(page)
    return page
