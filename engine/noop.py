"""Runtime no-op checks (docs/method.md §2.1 "Runtime check"): on a job's first batch, before any cell is
trusted, the explicit stack must reproduce each model's own forward.

    pt_diagonal_vs_hf, it_diagonal_vs_hf   diagonal cell Y(U_m, L_m) read through model m's own head
                                           vs. a plain HF `model(...)` forward (use_cache=False) of m
    pt_self_patch, it_self_patch           m's late stack run from m's own captured boundary residual
                                           vs. m's clean pass, at every requested boundary (the method's
                                           extra no-op cells)
    it_splice                              (mediation) IT's late stack with every dictionary spliced in,
                                           error term kept, vs. clean: max |Δ logit| over the vocabulary

Tolerance: float32 1e-4 absolute (the method's). bfloat16 / float16: 4 machine epsilons of the largest
|logit| compared (bf16 0.03125 x scale, fp16 0.0039 x scale, scale >= 1), i.e. a few units in the last
place of the half-precision logits themselves. NaN always fails.
Cost: 2 HF forwards (last position only) + 2 late stacks per boundary, on one batch per job; the clean
passes compared are the batch's own, so the 2x2 of that batch is not recomputed.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from crosspatch.engine.adapters import ArchAdapter, positions_from_mask
from crosspatch.engine.errors import NoopCheckError
from crosspatch.engine.pairs import ModelPair

if TYPE_CHECKING:
    from crosspatch.engine.crosspatch import CleanPasses
    from crosspatch.engine.divergence import DivergenceEvent
    from crosspatch.engine.mediation import FeatureDictionary

FP32_TOLERANCE = 1e-4
HALF_EPS_MULTIPLE = 4.0
METADATA_KEY = b"crosspatch.noop_check"


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Allowed max |Δ| for a model in `dtype` whose compared logits reach `scale` in magnitude."""
    if dtype == torch.float32 or dtype == torch.float64:
        return FP32_TOLERANCE
    return HALF_EPS_MULTIPLE * torch.finfo(dtype).eps * max(1.0, scale)


@dataclass
class NoopReport:
    """Measured max |Δ| per check on one batch, the tolerance they must meet, and the verdict."""

    dtype: str
    tolerance: float
    n_events: int
    boundaries: list[int]
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True if every check is within tolerance (NaN fails)."""
        return all(d <= self.tolerance for d in self.max_abs_diff.values())

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}

    def summary(self) -> str:
        """One line for logs and the CLI."""
        worst = max(self.max_abs_diff.values(), default=0.0)
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"runtime no-op check {verdict}: max |Δ| {worst:.1e} (tolerance {self.tolerance:.1e}, "
            f"{self.dtype}, {self.n_events} events; {', '.join(sorted(self.max_abs_diff))})"
        )

    def raise_if_failed(self) -> None:
        """Raise `NoopCheckError` naming every check over tolerance."""
        bad = {k: v for k, v in self.max_abs_diff.items() if not v <= self.tolerance}
        if bad:
            detail = "; ".join(f"{k} max |Δ| {v:.3g}" for k, v in sorted(bad.items()))
            raise NoopCheckError(
                f"runtime no-op check failed (docs/method.md §2.1): {detail} > tolerance {self.tolerance:.1e} "
                f"({self.dtype}, {self.n_events} events, boundaries {self.boundaries}); the explicit stack does "
                "not reproduce the model's own forward, so no cross-patched cell can be trusted"
            )


def _margin(adapter: ArchAdapter, final_resid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`[batch, d_model]` -> `[batch]` logit(t_it) - logit(t_pt) through `adapter`'s own head; tokens `[batch, 2]`."""
    logits = adapter.readout(final_resid.to(adapter.device), tokens.to(adapter.device)).float()  # [batch, 2]
    return logits[:, 0] - logits[:, 1]


def _hf_last_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[batch, vocab]` fp32 logits at the last position from the model's own forward (no cache)."""
    kwargs: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
    )
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # never materialise [batch, seq, vocab]
    return model(**kwargs).logits[:, -1].float()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float().cpu() - b.float().cpu()).abs()
    return float("nan") if diff.isnan().any() else float(diff.max()) if diff.numel() else 0.0


@torch.no_grad()
def role_noop_diffs(
    role: str,
    model: torch.nn.Module,
    adapter: ArchAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    final: torch.Tensor,
    captured: dict[int, torch.Tensor],
    context: Any,
    boundaries: Sequence[int],
) -> tuple[dict[str, float], float]:
    """One model's checks (diagonal vs HF, self-patch at every boundary) and its compared logits' max |.|.

    Needs only `role`'s model resident (staged execution checks each model in its own phase).
    """
    ref_logits = _hf_last_logits(model, input_ids, attention_mask)  # [batch, vocab]
    picked = ref_logits.gather(-1, tokens.to(ref_logits.device))  # [batch, 2]
    scale = float(picked.abs().max()) if picked.numel() else 1.0
    ref = picked[:, 0] - picked[:, 1]  # [batch]
    clean = _margin(adapter, final, tokens)  # [batch]
    worst = 0.0
    for b in boundaries:
        late = adapter.run_layers(captured[b], context, start=b)[0][:, -1]  # [batch, d_model]
        d = _max_abs(_margin(adapter, late, tokens), clean)
        worst = d if math.isnan(d) or math.isnan(worst) else max(worst, d)
    return {f"{role}_diagonal_vs_hf": _max_abs(clean, ref), f"{role}_self_patch": worst}, scale


def make_report(
    dtype: torch.dtype, scale: float, n_events: int, boundaries: Sequence[int], diffs: dict[str, float]
) -> NoopReport:
    """The report of measured `diffs` at the tolerance of `dtype` for logits reaching `scale`."""
    return NoopReport(
        dtype=str(dtype).removeprefix("torch."),
        tolerance=tolerance(dtype, max(1.0, scale)),
        n_events=int(n_events),
        boundaries=[int(b) for b in boundaries],
        max_abs_diff=diffs,
    )


@torch.no_grad()
def check_cells_noop(
    pair: ModelPair,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    passes: CleanPasses,
    boundaries: Sequence[int],
) -> NoopReport:
    """Measure diagonal-vs-HF and self-patch differences for one batch (`tokens` `[batch, 2]`: t_it, t_pt)."""
    diffs: dict[str, float] = {}
    scale = 1.0
    for role, model in (("pt", pair.pt), ("it", pair.it)):
        d, s = role_noop_diffs(
            role,
            model,
            pair.adapter(role),
            input_ids,
            attention_mask,
            tokens,
            passes.final[role],
            passes.captured[role],
            passes.contexts[role],
            boundaries,
        )
        diffs.update(d)
        scale = max(scale, s)
    return make_report(pair.it_adapter.dtype, scale, int(input_ids.shape[0]), boundaries, diffs)


@torch.no_grad()
def check_mediation_noop(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    dictionaries: Sequence[FeatureDictionary],
    boundary: int,
    batch_size: int = 8,
) -> NoopReport | None:
    """On the first (shortest) batch of diverged events: the cell checks at `boundary`, plus the splice no-op.

    Raises `NoopCheckError` if any check is over tolerance; None when there is no diverged event.
    """
    # imported here: crosspatch.py and mediation.py import this module
    from crosspatch.engine.crosspatch import clean_passes, event_batches
    from crosspatch.engine.mediation import splice_with_error

    first = next(event_batches(pair, events, max(1, batch_size)), None)
    if first is None:
        return None
    _, ids, mask, tokens = first
    passes = clean_passes(pair, ids, mask, [boundary])
    report = check_cells_noop(pair, ids, mask, tokens, passes, [boundary])
    it = pair.it_adapter
    worst, scale = 0.0, 1.0
    for upstream in ("it", "pt"):
        resid = passes.captured[upstream][boundary]  # [batch, seq, d_model]
        clean = it.readout(
            it.run_layers(resid, passes.contexts["it"], start=boundary)[0][:, -1]
        )  # [batch, vocab]
        with splice_with_error(it, dictionaries):
            spliced = it.readout(it.run_layers(resid, passes.contexts["it"], start=boundary)[0][:, -1])
        d = _max_abs(spliced, clean)
        worst = d if math.isnan(d) or math.isnan(worst) else max(worst, d)
        scale = max(scale, float(clean.float().abs().max()))
    report.max_abs_diff["it_splice"] = worst
    report.tolerance = max(report.tolerance, tolerance(it.dtype, scale))
    report.raise_if_failed()
    return report


def attach(table: pa.Table, report: NoopReport | None) -> pa.Table:
    """`table` carrying `report` in its schema metadata (kept by Parquet), or unchanged if None."""
    if report is None:
        return table
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(report.to_dict()).encode()
    return table.replace_schema_metadata(meta)


def noop_report(table: pa.Table) -> dict[str, Any] | None:
    """The no-op check a cells table was produced under (`crosspatch()` attaches it), or None."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None
