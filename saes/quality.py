"""Quality gate: is a dictionary good enough to trust in mediation? (method section 5.1)

Metrics on held-out tokens (a prompt-level split of the cache the dictionary did not train on):
- FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, per model branch (crosscoders: joint encoding,
  and `fve_<branch>_solo` with that branch's encoder alone, which is what splicing into one model uses);
- L0 (mean active latents per token); alive fraction = latents that fire at least once on the first
  `alive_sample_tokens` (8,192) held-out tokens, the sample the method's research code measures it on
  (a fixed sample keeps the [0.01, 0.20] band meaningful: on more tokens more latents fire);
  `dead_fraction` = latents that never fire on any held-out token;
- with models given: next-token cross-entropy and KL(clean || spliced) when the reconstruction replaces the
  MLP output at the dictionary's layer (`engine.hooks.mlp_hooks`), plus the zero-ablation
  loss for scale (`ce_loss_recovered`).

The gate (method section 5.1) is a list of named checks, each `{name, value, threshold, passed, status,
detail}` with status passed | failed | not_applicable | pending:
- `heldout_tokens` >= `min_heldout_tokens` (default 10,000): too few held-out tokens fail the gate;
- `fve_<branch>` >= 0.75 for every branch;
- `l0_target`: mean L0 within 10% of the (Batch)TopK target k ("not_applicable" for kinds without k);
- `alive_fraction` in [0.01, 0.20];
- `topk_causal_drop` > 0 and `matched_random_drop` <= 0.05: measured by mediation, so they start
  "pending"; `record_causal_checks` fills them by name (a failure there fails the gate).
The gate status is "failed" if any check failed, else "passed" (pending checks do not block: mediation is
what measures them). A failed dictionary is kept, marked "failed" in crosspatch_meta.json; `require_gate`
refuses it unless the caller overrides, and records the override.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from crosspatch.engine.adapters import adapter_for
from crosspatch.engine.hooks import mlp_hooks
from crosspatch.saes.cache import ActivationSource, act_key
from crosspatch.saes.errors import CacheError, GateFailedError
from crosspatch.saes.load import Dictionary

CAUSAL_CHECKS: tuple[str, ...] = ("topk_causal_drop", "matched_random_drop")
K_ARCHITECTURES: tuple[str, ...] = (
    "topk",
    "batchtopk",
    "batchtopk_transcoder",
    "batchtopk_skip_transcoder",
    "batchtopk_crosscoder",
    "crosscoder",
)


@dataclass
class GateConfig:
    """Thresholds of the quality gate (method section 5.1; None: that check is not run)."""

    min_fve: float = 0.75
    max_l0_rel_error: float | None = 0.10  # |L0 - k| / k, for (Batch)TopK kinds
    alive_range: tuple[float, float] | None = (0.01, 0.20)
    min_heldout_tokens: int = 10_000
    alive_sample_tokens: int | None = 8192  # alive fraction on the first N held-out tokens (None: all)
    min_topk_causal_drop: float = 0.0  # strictly greater than this
    max_matched_random_drop: float = 0.05
    max_delta_ce: float | None = None

    def __post_init__(self) -> None:
        if self.min_heldout_tokens < 1:
            raise ValueError(f"min_heldout_tokens must be >= 1, got {self.min_heldout_tokens}")
        if self.alive_range is not None:
            lo, hi = self.alive_range
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"alive_range must satisfy 0 <= lo <= hi <= 1, got {self.alive_range}")
            self.alive_range = (float(lo), float(hi))


def _sources_keys(d: Dictionary) -> dict[str, list[str]]:
    """Cache keys the dictionary reads, per branch: (input key, target key)."""
    layer = d.layer
    if layer is None:
        raise CacheError("dictionary has no layer in its metadata; cannot pick cache activations")
    if d.kind == "crosscoder":
        return {b: [act_key(b, layer, d.hook_point), act_key(b, layer, d.hook_point)] for b in d.branches}
    role = d.branches[0]
    return {role: [act_key(role, layer, d.input_hook), act_key(role, layer, d.hook_point)]}


@torch.no_grad()
def activation_metrics(
    d: Dictionary,
    source: ActivationSource,
    split: str = "heldout",
    heldout_fraction: float = 0.1,
    chunk: int = 4096,
    alive_sample_tokens: int | None = 8192,
) -> dict[str, Any]:
    """FVE per branch, L0, dead and alive fraction on `split` of the cache ({"n_tokens": 0} if empty).

    `alive_fraction` counts latents firing on the first `alive_sample_tokens` rows (None: all rows)."""
    keys = _sources_keys(d)
    for b, (kin, kout) in keys.items():  # validate early, with the cache's own message
        source.check_key(b, d.layer, kin.rsplit(".", 1)[1])
        source.check_key(b, d.layer, kout.rsplit(".", 1)[1])
    branches = list(keys)
    flat_keys = [k for b in branches for k in keys[b]]
    x = source.load(flat_keys, split, heldout_fraction)  # [n, 2 * n_branches * d]
    n = len(x)
    if n == 0:
        return {"n_tokens": 0}
    n_sample = n if alive_sample_tokens is None else min(n, alive_sample_tokens)
    D = d.d_in
    parts = x.reshape(n, len(branches), 2, D)  # [n, branch, (in, out), d]
    sse = torch.zeros(len(branches), dtype=torch.float64)
    sse_solo = torch.zeros(len(branches), dtype=torch.float64)
    fired = torch.zeros(d.n_latents, dtype=torch.bool)  # [F] on any held-out row
    fired_sample = torch.zeros(d.n_latents, dtype=torch.bool)  # [F] on the first n_sample rows
    l0_sum = 0.0
    for s in range(0, n, chunk):
        p = parts[s : s + chunk]  # [c, branch, 2, d]
        if d.kind == "crosscoder":
            acts = d.encode(p[:, :, 1])  # [c, F]
            x_hat = d.decode(acts)  # [c, branch, d]
            sse += (x_hat - p[:, :, 1]).double().pow(2).sum((0, 2))
            for i, b in enumerate(branches):
                solo = d.reconstruct(p[:, i, 1], branch=b)  # [c, d]
                sse_solo[i] += (solo - p[:, i, 1]).double().pow(2).sum()
        else:
            acts = d.encode(p[:, 0, 0])  # [c, F]
            x_hat = d.reconstruct(p[:, 0, 0])  # [c, d]
            sse[0] += (x_hat - p[:, 0, 1]).double().pow(2).sum()
        fired |= (acts > 0).any(0)
        if s < n_sample:
            fired_sample |= (acts[: n_sample - s] > 0).any(0)
        l0_sum += float((acts > 0).sum())
    target = parts[:, :, 1].double()  # [n, branch, d]
    sst = (target - target.mean(0)).pow(2).sum((0, 2))  # [branch]
    out: dict[str, Any] = {"n_tokens": n}
    for i, b in enumerate(branches):
        out[f"fve_{b}"] = float(1 - sse[i] / sst[i])
        if d.kind == "crosscoder":
            out[f"fve_{b}_solo"] = float(1 - sse_solo[i] / sst[i])
    out["fve_min"] = min(out[f"fve_{b}"] for b in branches)
    out["l0"] = l0_sum / n
    out["dead_fraction"] = float(1 - fired.float().mean())
    out["alive_fraction"] = float(fired_sample.float().mean())
    out["alive_sample_tokens"] = n_sample
    return out


@torch.no_grad()
def splice_metrics(
    d: Dictionary,
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    branch: str | None = None,
    batch_size: int = 8,
    skip_positions: int = 1,
) -> dict[str, float]:
    """Next-token CE clean vs. spliced vs. zero-ablated, and KL(clean || spliced), at `d`'s layer.

    The hook replaces the MLP output from position `skip_positions` on (position 0 is BOS, which the cache
    drops), for real (non-pad) tokens only.
    """
    adapter = adapter_for(model)
    layer = d.layer
    if layer is None or not 0 <= layer < adapter.n_layers:
        raise CacheError(f"dictionary layer {layer} is not a layer of this model ({adapter.n_layers} layers)")
    mode = {"v": "clean"}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        if mode["v"] == "clean":
            return None
        keep = mask_holder["m"][..., None]  # [batch, seq, 1]
        if mode["v"] == "zero":
            return torch.where(keep, torch.zeros_like(output), output)
        src = x if d.kind == "transcoder" else output
        b = branch if d.kind == "crosscoder" else None
        recon = d.reconstruct(src.float(), branch=b).to(output.dtype)  # [batch, seq, d]
        return torch.where(keep, recon, output)

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_tok = 0
    with mlp_hooks(adapter, {layer: hook}):
        for s in range(0, len(sequences), batch_size):
            batch = [list(q) for q in sequences[s : s + batch_size] if len(q) > skip_positions + 1]
            if not batch:
                continue
            T = max(len(q) for q in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            att = torch.zeros(len(batch), T, dtype=torch.long)
            for i, q in enumerate(batch):  # left padding, as the cache does
                ids[i, T - len(q) :] = torch.tensor(q)
                att[i, T - len(q) :] = 1
            pos = (att.cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
            keep = att.bool() & (pos >= skip_positions)  # positions whose MLP output is replaced
            mask_holder["m"] = keep.to(adapter.device)
            ids_d, att_d = ids.to(adapter.device), att.to(adapter.device)
            logits = {}
            for m in ("clean", "spliced", "zero"):
                mode["v"] = m
                logits[m] = adapter.forward_logits(ids_d, att_d).float()[:, :-1]  # [batch, seq-1, vocab]
            target = ids_d[:, 1:]
            # [batch, seq-1]: real target tokens whose input position was replaced
            valid = att_d[:, 1:].bool() & att_d[:, :-1].bool() & keep[:, :-1].to(att_d.device)
            for m in ("clean", "spliced", "zero"):
                ce = F.cross_entropy(logits[m].transpose(1, 2), target, reduction="none")  # [batch, seq-1]
                totals[m] += float(ce[valid].sum())
            lp_c = logits["clean"].log_softmax(-1)
            lp_s = logits["spliced"].log_softmax(-1)
            kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)  # [batch, seq-1]
            totals["kl"] += float(kl[valid].sum())
            n_tok += int(valid.sum())
    if n_tok == 0:
        raise CacheError("no held-out sequences long enough to measure the splice effect")
    ce_c, ce_s, ce_z = (totals[m] / n_tok for m in ("clean", "spliced", "zero"))
    denom = ce_z - ce_c
    return {
        "ce_loss_clean": ce_c,
        "ce_loss_spliced": ce_s,
        "ce_loss_zero_ablated": ce_z,
        "delta_ce": ce_s - ce_c,
        "kl": totals["kl"] / n_tok,
        "ce_loss_recovered": (ce_z - ce_s) / denom if abs(denom) > 1e-9 else float("nan"),
        "n_splice_tokens": n_tok,
    }


def _check(
    name: str, value: Any, threshold: str, passed: bool | None, status: str | None = None, detail: str = ""
) -> dict[str, Any]:
    """One named gate check; `status` defaults to passed / failed from `passed`."""
    if status is None:
        status = "passed" if passed else "failed"
    return {"name": name, "value": value, "threshold": threshold, "passed": passed, "status": status,
            "detail": detail}  # fmt: skip


def _status(checks: Sequence[Mapping[str, Any]]) -> str:
    """failed if any check failed, else passed (pending / not_applicable checks do not block)."""
    return "failed" if any(c["status"] == "failed" for c in checks) else "passed"


def apply_gate(d: Dictionary, metrics: Mapping[str, Any], gate: GateConfig) -> dict[str, Any]:
    """Gate record {status, checks, pending, config, overrides} from metrics; does not touch `d`."""
    n = int(metrics.get("n_tokens") or 0)
    checks = [
        _check(
            "heldout_tokens",
            n,
            f">= {gate.min_heldout_tokens}",
            n >= gate.min_heldout_tokens,
            detail=""
            if n >= gate.min_heldout_tokens
            else f"held-out set has {n} tokens, fewer than the minimum {gate.min_heldout_tokens}",
        )
    ]
    measured = n > 0
    for b in d.branches:
        v = metrics.get(f"fve_{b}")
        checks.append(
            _check(f"fve_{b}", v, f">= {gate.min_fve}", v is not None and v >= gate.min_fve)
            if measured
            else _check(f"fve_{b}", None, f">= {gate.min_fve}", None, "not_measured", "no held-out tokens")
        )
    if gate.max_l0_rel_error is not None:
        k = d.meta.get("k")
        arch = str(d.meta.get("architecture"))
        tol = gate.max_l0_rel_error
        if not k or arch not in K_ARCHITECTURES:
            checks.append(
                _check(
                    "l0_target",
                    metrics.get("l0"),
                    f"within {tol:.0%} of k",
                    None,
                    "not_applicable",
                    f"architecture {arch} has no (Batch)TopK target k"
                    if arch not in K_ARCHITECTURES
                    else "no target k recorded",
                )
            )
        else:
            lo, hi = k * (1 - tol), k * (1 + tol)
            l0 = metrics.get("l0")
            thr = f"in [{lo:.4g}, {hi:.4g}] (k={k:g} +- {tol:.0%})"
            checks.append(
                _check("l0_target", l0, thr, abs(l0 - k) / k <= tol + 1e-12)
                if measured
                else _check("l0_target", None, thr, None, "not_measured", "no held-out tokens")
            )
    if gate.alive_range is not None:
        lo, hi = gate.alive_range
        a = metrics.get("alive_fraction")
        thr = f"in [{lo:g}, {hi:g}]"
        checks.append(
            _check(
                "alive_fraction",
                a,
                thr,
                lo <= a <= hi,
                detail=f"latents firing on the first {metrics.get('alive_sample_tokens')} held-out tokens",
            )
            if measured
            else _check("alive_fraction", None, thr, None, "not_measured", "no held-out tokens")
        )
    if gate.max_delta_ce is not None:
        deltas = [v for kk, v in metrics.items() if kk.startswith("delta_ce")]
        worst = max(deltas) if deltas else None
        checks.append(
            _check(
                "delta_ce", worst, f"<= {gate.max_delta_ce}", worst is not None and worst <= gate.max_delta_ce
            )
        )
    checks.append(
        _check(
            "topk_causal_drop",
            None,
            f"> {gate.min_topk_causal_drop:g}",
            None,
            "pending",
            "measured by mediation: interaction drop of the top-k set on the test split",
        )
    )
    checks.append(
        _check(
            "matched_random_drop",
            None,
            f"<= {gate.max_matched_random_drop:g}",
            None,
            "pending",
            "measured by mediation: interaction drop of the matched-random sets",
        )
    )
    return {
        "status": _status(checks),
        "checks": checks,
        "pending": [c["name"] for c in checks if c["status"] == "pending"],
        "config": asdict(gate),
        "overrides": [],
    }


def failed_checks(gate_record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The failed checks of a gate record (works on records written before checks were named: empty)."""
    checks = gate_record.get("checks") or []
    return [c for c in checks if isinstance(c, Mapping) and c.get("status") == "failed"]


def describe_check(c: Mapping[str, Any]) -> str:
    """'alive_fraction 0.984 (in [0.01, 0.2]): failed' for printing."""
    v = c.get("value")
    val = "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{c['name']} {val} ({c['threshold']}): {c['status']}"


def format_gate(gate_record: Mapping[str, Any]) -> str:
    """The gate as printed lines: status, then one line per named check."""
    lines = [f"quality gate: {gate_record.get('status', 'not_evaluated')}"]
    for c in gate_record.get("checks") or []:
        extra = f"  ({c['detail']})" if c.get("detail") and c["status"] != "passed" else ""
        lines.append(f"  {describe_check(c)}{extra}")
    for o in gate_record.get("overrides") or []:
        lines.append(f"  override at {o.get('at')}: {o.get('reason') or 'no reason given'}")
    return "\n".join(lines)


def record_causal_checks(
    d: Dictionary, measured: Sequence[Mapping[str, Any]], *, source: str = "", save: bool = True
) -> dict[str, Any]:
    """Fill the gate's pending causal checks from mediation's measured checks; returns the gate record.

    `measured` are `engine.controls.causal_checks` dicts ({name, value, detail, ...}) named
    `topk_causal_drop` and `matched_random_drop`. A measured value is judged against the thresholds stored
    in the gate's config (> `min_topk_causal_drop`, <= `max_matched_random_drop`); a check mediation could
    not measure (value None: nothing to ablate, or the control unavailable) fails with mediation's reason.
    A failure fails the gate; `source` (e.g. "job 12, k=200") is kept in each check's detail.
    """
    # a new record: earlier copies (provenance) stay as they were
    gate = copy.deepcopy(d.meta.get("gate") or {})
    if not gate.get("checks"):
        raise GateFailedError(f"dictionary {d.id or d.path} has no evaluated gate to attach causal checks to")
    cfg = GateConfig(**{k: tuple(v) if k == "alive_range" and v else v for k, v in gate["config"].items()})
    rules = {
        "topk_causal_drop": lambda v: v > cfg.min_topk_causal_drop,
        "matched_random_drop": lambda v: v <= cfg.max_matched_random_drop,
    }
    by_name = {m["name"]: m for m in measured if m["name"] in rules}
    where = f" ({source})" if source else ""
    for c in gate["checks"]:
        m = by_name.get(c["name"])
        if m is None:
            continue
        v = m.get("value")
        ok = v is not None and bool(rules[c["name"]](float(v)))
        c.update(
            value=None if v is None else float(v),
            passed=ok,
            status="passed" if ok else "failed",
            detail=f"measured by mediation{where}: {m.get('detail', '')}",
        )
    gate["pending"] = [c["name"] for c in gate["checks"] if c["status"] == "pending"]
    gate["status"] = _status(gate["checks"])
    d.meta["gate"] = gate
    if save:
        d.save_meta()
    return gate


def evaluate_dictionary(
    d: Dictionary,
    source: ActivationSource,
    *,
    models: Mapping[str, PreTrainedModel] | None = None,
    gate: GateConfig | None = None,
    heldout_fraction: float = 0.1,
    n_splice_sequences: int = 64,
    save: bool = True,
) -> dict[str, Any]:
    """Compute held-out metrics (and splice metrics for each branch with a model in `models`), apply the
    gate, store both in `d.meta` (and in crosspatch_meta.json when `save`). Returns the metrics."""
    gate = gate or GateConfig()
    metrics = activation_metrics(
        d, source, "heldout", heldout_fraction, alive_sample_tokens=gate.alive_sample_tokens
    )
    if models and metrics["n_tokens"] > 0:
        seqs = source.sequences("heldout", heldout_fraction)[:n_splice_sequences]
        for b in d.branches:
            if b in models:
                sm = splice_metrics(d, models[b], seqs, branch=b)
                metrics.update({f"{k}_{b}": v for k, v in sm.items()})
    metrics["heldout_fraction"] = heldout_fraction
    d.meta["metrics"] = metrics
    overrides = (d.meta.get("gate") or {}).get("overrides") or []
    d.meta["gate"] = apply_gate(d, metrics, gate)
    d.meta["gate"]["overrides"] = list(overrides)  # a re-evaluation keeps the history of overrides
    if save:
        d.save_meta()
    return metrics


def require_gate(d: Dictionary, override: bool = False, reason: str = "") -> dict[str, Any]:
    """Refuse a dictionary that did not pass the gate unless `override`; record overrides in its meta.

    Returns a record for the caller's result and provenance: {"dictionary", "gate_status", "overridden",
    "checks"} (+ "override" {at, reason, status, failed} when overridden).
    """
    status = d.gate_status
    gate = d.meta.get("gate") or {}
    checks = list(gate.get("checks") or [])
    if status == "passed":
        return {"dictionary": d.id, "gate_status": status, "overridden": False, "checks": checks}
    failed = failed_checks(gate)
    if not override:
        detail = f": {'; '.join(describe_check(c) for c in failed)}" if failed else ""
        raise GateFailedError(
            f"dictionary {d.id or d.path} has gate status {status!r}{detail}; "
            "evaluate it, train a better one, or pass override=True (--allow-failed-gate) to use it anyway"
        )
    record = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "status": status,
        "failed": [c["name"] for c in failed],
    }
    d.meta.setdefault("gate", {"status": status}).setdefault("overrides", []).append(record)
    d.save_meta()
    return {
        "dictionary": d.id,
        "gate_status": status,
        "overridden": True,
        "checks": checks,
        "override": record,
    }
