"""Quality gate: is a dictionary good enough to trust in mediation?

Metrics on held-out tokens (a prompt-level split of the cache the dictionary did not train on):
- FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, per model branch (crosscoders: joint encoding,
  and `fve_<branch>_solo` with that branch's encoder alone, which is what splicing into one model uses);
- L0 (mean active latents per token), dead fraction (latents that never fire on the held-out tokens);
- with models given: next-token cross-entropy and KL(clean || spliced) when the reconstruction replaces the
  MLP output at the dictionary's layer (a forward hook on `adapter.mlp(layer)`), plus the zero-ablation
  loss for scale (`ce_loss_recovered`).

The default gate is FVE >= 0.75 on every branch (method §5.1); L0 and alive-fraction checks can be added.
A failed dictionary is kept, marked "failed" in crosspatch_meta.json; `require_gate` refuses it unless the
caller overrides, and records the override.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F

from crosspatch.engine.adapters import adapter_for
from crosspatch.saes.cache import act_key
from crosspatch.saes.errors import CacheError, GateFailedError
from crosspatch.saes.load import Dictionary


@dataclass
class GateConfig:
    """Thresholds of the quality gate (None: not checked)."""

    min_fve: float = 0.75
    max_l0_rel_error: float | None = None  # |L0 - k| / k, e.g. 0.10
    alive_range: tuple[float, float] | None = None  # e.g. (0.01, 0.20) as in the method
    max_delta_ce: float | None = None


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
    d: Dictionary, source: Any, split: str = "heldout", heldout_fraction: float = 0.1, chunk: int = 4096
) -> dict[str, Any]:
    """FVE per branch, L0, dead and alive fraction on `split` of the cache."""
    keys = _sources_keys(d)
    for b, (kin, kout) in keys.items():  # validate early, with the cache's own message
        source.check_key(b, d.layer, kin.rsplit(".", 1)[1])
        source.check_key(b, d.layer, kout.rsplit(".", 1)[1])
    branches = list(keys)
    flat_keys = [k for b in branches for k in keys[b]]
    x = source.load(flat_keys, split, heldout_fraction)  # [n, 2 * n_branches * d]
    n = len(x)
    if n == 0:
        raise CacheError(
            f"no {split} tokens in the cache to evaluate on (heldout_fraction={heldout_fraction})"
        )
    D = d.d_in
    parts = x.reshape(n, len(branches), 2, D)  # [n, branch, (in, out), d]
    sse = torch.zeros(len(branches), dtype=torch.float64)
    sse_solo = torch.zeros(len(branches), dtype=torch.float64)
    fired = torch.zeros(d.n_latents, dtype=torch.bool)
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
    out["alive_fraction"] = float(fired.float().mean())
    return out


@torch.no_grad()
def splice_metrics(
    d: Dictionary,
    model: Any,
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
    mlp = adapter.mlp(layer)
    mode = {"v": "clean"}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if mode["v"] == "clean":
            return None
        keep = mask_holder["m"][..., None]  # [batch, seq, 1]
        if mode["v"] == "zero":
            return torch.where(keep, torch.zeros_like(output), output)
        x = args[0] if args else next(iter(kwargs.values()))
        src = x if d.kind == "transcoder" else output
        b = branch if d.kind == "crosscoder" else None
        recon = d.reconstruct(src.float(), branch=b).to(output.dtype)  # [batch, seq, d]
        return torch.where(keep, recon, output)

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_tok = 0
    handle = mlp.register_forward_hook(hook, with_kwargs=True)
    try:
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
            valid = (
                att_d[:, 1:].bool() & att_d[:, :-1].bool() & keep[:, :-1].to(att_d.device)
            )  # [batch, seq-1]
            for m in ("clean", "spliced", "zero"):
                ce = F.cross_entropy(logits[m].transpose(1, 2), target, reduction="none")  # [batch, seq-1]
                totals[m] += float(ce[valid].sum())
            lp_c = logits["clean"].log_softmax(-1)
            lp_s = logits["spliced"].log_softmax(-1)
            kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1)  # [batch, seq-1]
            totals["kl"] += float(kl[valid].sum())
            n_tok += int(valid.sum())
    finally:
        handle.remove()
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


def apply_gate(d: Dictionary, metrics: Mapping[str, Any], gate: GateConfig) -> dict[str, Any]:
    """Gate record {status, checks, config} from metrics; does not touch `d`."""
    checks: dict[str, dict[str, Any]] = {}
    for b in d.branches:
        v = metrics.get(f"fve_{b}")
        checks[f"fve_{b}"] = {"value": v, "min": gate.min_fve, "ok": v is not None and v >= gate.min_fve}
    k = d.meta.get("k")
    if gate.max_l0_rel_error is not None and k:
        err = abs(metrics["l0"] - k) / k
        checks["l0_rel_error"] = {
            "value": err,
            "max": gate.max_l0_rel_error,
            "ok": err <= gate.max_l0_rel_error,
        }
    if gate.alive_range is not None:
        lo, hi = gate.alive_range
        a = metrics["alive_fraction"]
        checks["alive_fraction"] = {"value": a, "range": [lo, hi], "ok": lo <= a <= hi}
    if gate.max_delta_ce is not None:
        deltas = [v for kk, v in metrics.items() if kk.startswith("delta_ce")]
        worst = max(deltas) if deltas else None
        checks["delta_ce"] = {
            "value": worst,
            "max": gate.max_delta_ce,
            "ok": worst is not None and worst <= gate.max_delta_ce,
        }
    ok = all(c["ok"] for c in checks.values())
    return {"status": "passed" if ok else "failed", "checks": checks, "config": asdict(gate), "overrides": []}


def evaluate_dictionary(
    d: Dictionary,
    source: Any,
    *,
    models: Mapping[str, Any] | None = None,
    gate: GateConfig | None = None,
    heldout_fraction: float = 0.1,
    n_splice_sequences: int = 64,
    save: bool = True,
) -> dict[str, Any]:
    """Compute held-out metrics (and splice metrics for each branch with a model in `models`), apply the
    gate, store both in `d.meta` (and in crosspatch_meta.json when `save`). Returns the metrics."""
    gate = gate or GateConfig()
    metrics = activation_metrics(d, source, "heldout", heldout_fraction)
    if models:
        seqs = source.sequences("heldout", heldout_fraction)[:n_splice_sequences]
        for b in d.branches:
            if b in models:
                sm = splice_metrics(d, models[b], seqs, branch=b)
                metrics.update({f"{k}_{b}": v for k, v in sm.items()})
    metrics["heldout_fraction"] = heldout_fraction
    d.meta["metrics"] = metrics
    d.meta["gate"] = apply_gate(d, metrics, gate)
    if save:
        d.save_meta()
    return metrics


def require_gate(d: Dictionary, override: bool = False, reason: str = "") -> dict[str, Any]:
    """Refuse a dictionary that did not pass the gate unless `override`; record overrides in its meta.

    Returns a record for the caller's result ({"dictionary", "gate_status", "overridden"}).
    """
    status = d.gate_status
    if status == "passed":
        return {"dictionary": d.id, "gate_status": status, "overridden": False}
    if not override:
        fve = d.meta.get("metrics", {}).get("fve_min")
        detail = (
            f" (FVE min {fve:.3f} < {d.meta['gate']['config']['min_fve']})"
            if fve is not None and status == "failed"
            else ""
        )
        raise GateFailedError(
            f"dictionary {d.id or d.path} has gate status {status!r}{detail}; "
            "evaluate it, train a better one, or pass override=True (--allow-failed-gate) to use it anyway"
        )
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason, "status": status}
    d.meta.setdefault("gate", {"status": status}).setdefault("overrides", []).append(record)
    d.save_meta()
    return {"dictionary": d.id, "gate_status": status, "overridden": True, "override": record}
