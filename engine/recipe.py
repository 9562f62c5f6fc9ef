"""Secondary scales of the 2x2 and recipe comparisons (method sections 2.2, 4.1 and 4.7).

- Recipe contrast: two descendants of one base on the same support, interaction A - B per prompt, with
  a bootstrap CI and the sign-flip (label-swap) null.
- Lineage sweep: fix one pair's events and labels (base -> final) and score every stage checkpoint as
  "IT" against the base: one row per stage, with its share of the reference stage's interaction and how
  often its own greedy token is the final's t_IT. Cumulative comparisons, not causal stage attribution.
- Portable share = mean PT-upstream late effect / mean IT-upstream late effect (the "direct component").
- Interaction share = mean interaction / mean native diagonal shift, Y(U_IT, L_IT) - Y(U_PT, L_PT).
Both are ratios of means; their CIs are percentile bootstraps of the ratio over shared prompt resamples
(numerator and denominator resampled together), the resamples `engine.stats.bootstrap_means` draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.control_schemas import LINEAGE_CELLS_SCHEMA, LINEAGE_SCHEMA, RECIPE_CONTRAST_SCHEMA
from crosspatch.engine.crosspatch import CELLS, clean_passes, event_batches, late_stack_final, margin
from crosspatch.engine.divergence import DivergenceEvent, real_token_mask
from crosspatch.engine.pairs import ModelPair, check_readout
from crosspatch.engine.results import event_key_columns
from crosspatch.engine.stats import bootstrap_ci, bootstrap_means, sign_flip_pvalue


@dataclass(frozen=True)
class Ratio:
    """A ratio of two means with its bootstrap CI (`nan` where the denominator's mean is 0)."""

    estimate: float
    ci_low: float
    ci_high: float
    numerator: float
    denominator: float
    n: int


def ratio_of_means(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    seed: int = 23,
    level: float = 0.95,
) -> Ratio:
    """mean(numerator) / mean(denominator) over paired units, CI from shared resamples of the pairs."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(
            f"numerator and denominator must be paired 1-d samples, got {num.shape} and {den.shape}"
        )
    means = bootstrap_means(np.column_stack([num, den]), n_resamples, seed)  # [R, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = means[:, 0] / means[:, 1]  # [R]
    n_mean, d_mean = float(num.mean()), float(den.mean())
    estimate = n_mean / d_mean if d_mean != 0 else float("nan")
    finite = ratios[np.isfinite(ratios)]
    if d_mean == 0 or len(finite) < len(ratios):
        return Ratio(estimate, float("nan"), float("nan"), n_mean, d_mean, len(num))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return Ratio(estimate, float(lo), float(hi), n_mean, d_mean, len(num))


def single_boundary(pair: ModelPair, boundary: int | float | str | None) -> int:
    """The one boundary a control runs at (`None` = the pair's default); a list or a sweep is refused."""
    resolved = pair.resolve_boundaries(boundary)
    if len(resolved) != 1:
        raise ValueError(f"this control runs at one boundary, got {resolved}; run it once per boundary")
    return resolved[0]


def _column(cells: pa.Table, name: str) -> np.ndarray:
    return np.asarray(cells.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _one_group(cells: pa.Table) -> None:
    """The scales are per family x boundary x readout: refuse a table that mixes them."""
    for key in ("pair_id", "boundary", "readout"):
        if key in cells.column_names and len(set(cells.column(key).to_pylist())) > 1:
            raise ValueError(f"cells table mixes several {key} values; filter it to one {key} first")


def portable_share(cells: pa.Table, n_resamples: int = 2000, seed: int = 23) -> Ratio:
    """Mean PT-up late effect / mean IT-up late effect of one cells table (one pair, boundary, readout)."""
    _one_group(cells)
    return ratio_of_means(
        _column(cells, "pt_late_effect"), _column(cells, "it_late_effect"), n_resamples, seed
    )


def interaction_share(cells: pa.Table, n_resamples: int = 2000, seed: int = 23) -> Ratio:
    """Mean interaction / mean native diagonal shift Y(U_IT, L_IT) - Y(U_PT, L_PT) of one cells table."""
    _one_group(cells)
    diagonal = _column(cells, "y_itup_itlate") - _column(cells, "y_ptup_ptlate")
    return ratio_of_means(_column(cells, "interaction"), diagonal, n_resamples, seed)


# ---- recipe contrast (section 4.1) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Contrast:
    """Mean per-prompt difference of two descendants' interactions on one support, CI and sign-flip p."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int


def recipe_contrast(
    cells_a: pa.Table, cells_b: pa.Table, n_resamples: int = 2000, n_permutations: int = 20000, seed: int = 23
) -> Contrast:
    """Interaction of descendant A minus descendant B, paired by prompt on their shared support.

    The null swaps the two descendants' labels within a prompt (a sign flip of the difference), as the
    method's instruction-minus-domain contrast.
    """
    for cells in (cells_a, cells_b):
        _one_group(cells)
    a = dict(zip(cells_a.column("prompt_id").to_pylist(), _column(cells_a, "interaction"), strict=True))
    b = dict(zip(cells_b.column("prompt_id").to_pylist(), _column(cells_b, "interaction"), strict=True))
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two cells tables share no prompt: a contrast needs one support")
    diff = np.array([a[p] - b[p] for p in shared])  # [n]
    mean, lo, hi = bootstrap_ci(diff, n_resamples, seed)
    return Contrast(mean, lo, hi, sign_flip_pvalue(diff, n_permutations, seed), len(diff))


# ---- fixed-support lineage sweep (section 4.7) -------------------------------------------------------


def check_labels(pair: ModelPair, events: Sequence[DivergenceEvent], stage: str) -> None:
    """Preflight: every label must be a token both the base and the stage can read out (shared vocabulary)."""
    limit = min(
        len(pair.tokenizer),
        len(pair.it_tokenizer),
        pair.pt.get_output_embeddings().weight.shape[0],
        pair.it.get_output_embeddings().weight.shape[0],
    )
    bad = [e.prompt_id for e in events if e.diverged and not (0 <= e.t_pt < limit and 0 <= e.t_it < limit)]
    if bad:
        raise ValueError(
            f"{len(bad)} events have labels outside the vocabulary shared by the base and stage {stage!r} "
            f"(ids must be < {limit}; e.g. prompt {bad[0]!r}): drop them or fix the support"
        )


@torch.no_grad()
def _stage_cells(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int,
    readout: str,
    stage: str,
    batch_size: int,
) -> pa.Table:
    """The 2x2 of one stage (as IT) and its native top-1 at each event; two clean passes + two late stacks."""
    allowed = torch.where(real_token_mask(pair.it, pair.it_tokenizer), 0.0, float("-inf"))  # [vocab]
    parts = []
    for batch, ids, mask, tokens in event_batches(pair, events, batch_size):
        passes = clean_passes(pair, ids, mask, [boundary])
        y = {}
        for (up, late), column in CELLS.items():
            final = late_stack_final(pair, up, late, passes, boundary)  # [batch, d_model]
            adapter = pair.adapter(late if readout == "own" else readout)
            y[column] = margin(adapter, final, tokens).double().cpu().numpy()  # [batch]
        logits = pair.it_adapter.readout(passes.final["it"]).float()  # [batch, vocab]
        top1 = (logits + allowed.to(logits.device)[: logits.shape[-1]]).argmax(-1).cpu()  # [batch]
        pt_late = y["y_ptup_itlate"] - y["y_ptup_ptlate"]
        it_late = y["y_itup_itlate"] - y["y_itup_ptlate"]
        n = len(batch)
        parts.append(
            pa.table(
                {
                    **event_key_columns(pair.family, pair.pair_id, batch),
                    "t_pt": [e.t_pt for e in batch],
                    "t_it": [e.t_it for e in batch],
                    "boundary": [boundary] * n,
                    "readout": [readout] * n,
                    "pair_label": [pair.pair_label] * n,
                    "n_layers": [pair.n_layers] * n,
                    "headline_boundary": [boundary] * n,  # one boundary per stage: it is the headline
                    **y,
                    "pt_late_effect": pt_late,
                    "it_late_effect": it_late,
                    "interaction": it_late - pt_late,
                    "near_tie": [e.near_tie for e in batch],
                    "stage": [stage] * n,
                    "native_top1_it": (top1 == tokens[:, 0].cpu()).numpy(),
                },
                schema=LINEAGE_CELLS_SCHEMA,
            )
        )
    table = pa.concat_tables(parts) if parts else LINEAGE_CELLS_SCHEMA.empty_table()
    return table.sort_by("prompt_id")


def lineage_sweep(
    base: PreTrainedModel,
    stages: Mapping[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    reference: str | None = None,
    base_id: str = "base",
    stage_tokenizers: Mapping[str, PreTrainedTokenizerBase] | None = None,
    batch_size: int = 16,
    family: str | None = None,
) -> pa.Table:
    """Score every stage as "IT" against `base` on one fixed support and labels; one cells table for all stages.

    `events` are the support (e.g. base -> final first divergences) with their (t_base, t_final) labels.
    """
    check_readout(readout)
    if not stages:
        raise ValueError("lineage_sweep needs at least one stage")
    if reference is not None and reference not in stages:
        raise ValueError(f"reference stage {reference!r} is not one of {', '.join(stages)}")
    parts = []
    for name, model in stages.items():
        it_tok = (stage_tokenizers or {}).get(name, tokenizer)
        pair = ModelPair.from_models(
            base, model, tokenizer, it_tok, family=family, pair_id=f"{base_id}~{name}"
        )
        check_labels(pair, events, name)
        b = single_boundary(pair, boundary)
        parts.append(_stage_cells(pair, events, b, readout, name, batch_size))
    return pa.concat_tables(parts)


def summarize_lineage(
    cells: pa.Table,
    reference: str | None = None,
    n_resamples: int = 2000,
    n_permutations: int = 20000,
    seed: int = 23,
) -> pa.Table:
    """One `LINEAGE_SCHEMA` row per stage (in first-seen order); shares relative to `reference` (default: last)."""
    stages = list(dict.fromkeys(cells.column("stage").to_pylist()))
    if not stages:
        raise ValueError("no stages to summarize")
    reference = reference or stages[-1]
    if reference not in stages:
        raise ValueError(f"reference stage {reference!r} is not one of {', '.join(stages)}")
    by_stage = {}
    for s in stages:
        sub = cells.filter(pc.equal(cells.column("stage"), s)).sort_by("prompt_id")
        _one_group(sub)
        by_stage[s] = sub
    ref_ids = by_stage[reference].column("prompt_id").to_pylist()
    rows = []
    for s, sub in by_stage.items():
        if sub.column("prompt_id").to_pylist() != ref_ids:
            raise ValueError(f"stage {s!r} was not scored on the reference stage's support")
        x = _column(sub, "interaction")
        mean, lo, hi = bootstrap_ci(x, n_resamples, seed)
        share = ratio_of_means(x, _column(by_stage[reference], "interaction"), n_resamples, seed)
        pt_late, it_late = _column(sub, "pt_late_effect").mean(), _column(sub, "it_late_effect").mean()
        rows.append(
            {
                "family": sub.column("family")[0].as_py(),
                "base_id": sub.column("pair_id")[0].as_py().rsplit("~", 1)[0],
                "boundary": sub.column("boundary")[0].as_py(),
                "readout": sub.column("readout")[0].as_py(),
                "stage": s,
                "n": len(x),
                "interaction": mean,
                "ci_low": lo,
                "ci_high": hi,
                "p_value": sign_flip_pvalue(x, n_permutations, seed),
                "pt_late_effect": float(pt_late),
                "it_late_effect": float(it_late),
                "portable_share": float(pt_late / it_late) if it_late != 0 else float("nan"),
                "share_of_reference": share.estimate,
                "share_ci_low": share.ci_low,
                "share_ci_high": share.ci_high,
                "native_top1_rate": float(np.mean(sub.column("native_top1_it").to_pylist())),
            }
        )
    return pa.Table.from_pylist(rows, schema=LINEAGE_SCHEMA)


def contrast_table(
    cells: pa.Table,
    contrasts: Sequence[tuple[str, str]],
    n_resamples: int = 2000,
    n_permutations: int = 20000,
    seed: int = 23,
) -> pa.Table:
    """RECIPE_CONTRAST_SCHEMA rows for (stage_a, stage_b) pairs of a lineage cells table (LINEAGE_CELLS_SCHEMA)."""
    stages = set(cells.column("stage").to_pylist())
    rows = []
    for a, b in contrasts:
        for s in (a, b):
            if s not in stages:
                raise ValueError(f"contrast stage {s!r} is not one of the swept stages {sorted(stages)}")
        sub_a = cells.filter(pc.equal(cells.column("stage"), a))
        sub_b = cells.filter(pc.equal(cells.column("stage"), b))
        c = recipe_contrast(sub_a, sub_b, n_resamples, n_permutations, seed)
        rows.append(
            {
                "family": sub_a.column("family")[0].as_py(),
                "base_id": sub_a.column("pair_id")[0].as_py().rsplit("~", 1)[0],
                "boundary": sub_a.column("boundary")[0].as_py(),
                "readout": sub_a.column("readout")[0].as_py(),
                "stage_a": a,
                "stage_b": b,
                "estimate": c.estimate,
                "ci_low": c.ci_low,
                "ci_high": c.ci_high,
                "p_value": c.p_value,
                "n": c.n,
                "n_permutations": n_permutations,
            }
        )
    return pa.Table.from_pylist(rows, schema=RECIPE_CONTRAST_SCHEMA)
