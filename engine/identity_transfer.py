"""Identity transfer (method section 4.8): does a window of the donor model make the host pick the donor's token?

At each divergence event, host h in {pt, it} and donor d the other model, for a window [s, e) of blocks:
    blocks graft   the host's clean residual entering s runs the donor's blocks s..e-1 (the donor's own
                   context), then the host's blocks e..L-1
    mlp graft      the host's blocks s..L-1 with the donor's MLP modules in blocks s..e-1 computed on the
                   host's own MLP inputs (`engine.hooks.mlp_hooks`, as `engine.handoff`'s window grafts)
    transferred    the host's greedy top-1 (its own final norm + unembedding, masked to real tokens, the way
                   it decoded) is the donor's token: t_IT for the PT host, t_PT for the IT host
    margin_gain    the move of Y = logit(t_IT) - logit(t_PT) (through `readout`) toward the donor's token:
                   Y(grafted) - Y(host) for the PT host, Y(host) - Y(grafted) for the IT host
Windows, scaled to L by `engine.handoff.default_windows` (terminal = L): blocks early [0, r(0.4 L)),
middle [r(0.3 L), r(0.7 L)), late [b, L); MLPs late [b, L) and final_k [L - k, L) per `mlp_windows` k. The
method's rows: "IT-token identity transfer, PT host: middle vs late" (blocks, PT host), "PT-token
transfer, IT host" (blocks, IT host), "Final-three MLP identity transfer" (mlp final_3, PT host), "PT-host
late MLP margin gain" (mlp late, PT host, margin_gain). A final_k with k outside 1..L is a row with `valid`
false and the reason. Without a graft the host's top-1 is its own token, so the rate's floor is 0.

Forward work per batch: 2 clean passes (capturing every window start), then per valid window and host one
partial stack from the window's start: with the default windows, 2 x (3 + 3) partial stacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.anatomy import control_boundary
from crosspatch.engine.control_schemas import IDENTITY_TRANSFER_EVENTS_SCHEMA, IDENTITY_TRANSFER_SCHEMA
from crosspatch.engine.crosspatch import CleanPasses, clean_passes, event_batches, readout_margin
from crosspatch.engine.divergence import DivergenceEvent, real_token_mask
from crosspatch.engine.handoff import default_windows
from crosspatch.engine.hooks import MlpHook, mlp_hooks
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import event_key_columns
from crosspatch.engine.stats import bootstrap_ci

HOSTS: tuple[str, ...] = ("pt", "it")
GRAFTS: tuple[str, ...] = ("blocks", "mlp")
DEFAULT_MLP_WINDOWS: tuple[int, ...] = (3,)  # the final-three MLPs, as the method reports them
_BLOCK_NAMES = {"early": "early", "mid": "middle", "late_preterminal": "late"}  # handoff's name -> ours

Window = tuple[str, str, tuple[int, int], str | None]  # (graft, name, (start, stop), reason or None)


def transfer_windows(n_layers: int, boundary: int, mlp_windows: Sequence[int]) -> list[Window]:
    """The windows measured at `boundary` of `n_layers` blocks, each with the reason it cannot be (or None)."""
    scaled = default_windows(n_layers, boundary, n_layers)
    out: list[Window] = [("blocks", ours, scaled[h], None) for h, ours in _BLOCK_NAMES.items() if h in scaled]
    out.append(("mlp", "late", (boundary, n_layers), None))
    for k in mlp_windows:
        reason = None if 1 <= k <= n_layers else f"final_{k} needs 1 <= k <= {n_layers} blocks"
        out.append(("mlp", f"final_{k}", (max(n_layers - k, 0), n_layers), reason))
    return out


def _donor_mlps(pair: ModelPair, donor: str, span: tuple[int, int]) -> dict[int, MlpHook]:
    """{layer: hook} replacing the host's MLP output by the donor's MLP on the host's MLP input."""
    adapter = pair.adapter(donor)  # type: ignore[arg-type]

    def graft(layer: int) -> MlpHook:
        return lambda x, _out: adapter.mlp(layer)(x)  # [batch, seq, d_model]

    return {layer: graft(layer) for layer in range(*span)}


def grafted_final(
    pair: ModelPair, passes: CleanPasses, host: str, graft: str, span: tuple[int, int]
) -> torch.Tensor:
    """`[batch, d_model]` host's final residual at the scored position with the donor's window `span` grafted."""
    donor = "it" if host == "pt" else "pt"
    h, d = pair.adapter(host), pair.adapter(donor)  # type: ignore[arg-type]
    start, stop = span
    resid = passes.captured[host][start].to(h.device)  # [batch, seq, d_model]
    if graft == "blocks":
        resid = d.run_layers(resid, passes.contexts[donor], start=start, stop=stop)[0]
        return h.run_layers(resid.to(h.device), passes.contexts[host], start=stop)[0][:, -1]
    with mlp_hooks(h, _donor_mlps(pair, donor, span)):
        return h.run_layers(resid, passes.contexts[host], start=start)[0][:, -1]  # [batch, d_model]


@torch.no_grad()
def identity_transfer(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    mlp_windows: Sequence[int] = DEFAULT_MLP_WINDOWS,
    batch_size: int = 16,
    n_resamples: int = 2000,
    seed: int = 23,
) -> tuple[pa.Table, pa.Table]:
    """(IDENTITY_TRANSFER_EVENTS_SCHEMA rows per event x host x window, IDENTITY_TRANSFER_SCHEMA summary)."""
    b = control_boundary(pair, boundary, readout, batch_size, mlp_windows, "mlp_windows")
    windows = transfer_windows(pair.n_layers, b, mlp_windows)
    valid = [w for w in windows if w[3] is None]
    starts = sorted({span[0] for _, _, span, _ in valid})
    allowed = {
        "pt": torch.where(real_token_mask(pair.pt, pair.tokenizer), 0.0, float("-inf")),  # [vocab]
        "it": torch.where(real_token_mask(pair.it, pair.it_tokenizer), 0.0, float("-inf")),
    }
    parts = []
    for batch, ids, mask, tokens in event_batches(pair, events, batch_size):
        passes = clean_passes(pair, ids, mask, starts)  # 2 full forwards
        n = len(batch)
        for host in HOSTS:
            adapter = pair.adapter(host)  # type: ignore[arg-type]
            neg = allowed[host].to(adapter.device)
            target = tokens[:, 0 if host == "pt" else 1].cpu()  # [batch] the donor's token
            sign = 1.0 if host == "pt" else -1.0
            y_host = readout_margin(pair, readout, host, passes.final[host], tokens)  # [batch]
            for graft, name, span, _ in valid:
                final = grafted_final(pair, passes, host, graft, span)  # [batch, d_model]
                logits = adapter.readout(final.to(adapter.device)).float()  # [batch, vocab]
                top1 = (logits + neg[: logits.shape[-1]]).argmax(-1).cpu()  # [batch]
                y = readout_margin(pair, readout, host, final, tokens)  # [batch]
                parts.append(
                    pa.table(
                        {
                            **event_key_columns(pair.family, pair.pair_id, batch),
                            "boundary": [b] * n,
                            "readout": [readout] * n,
                            "host": [host] * n,
                            "graft": [graft] * n,
                            "window_name": [name] * n,
                            "layer_start": [span[0]] * n,
                            "layer_stop": [span[1]] * n,
                            "top1": top1.numpy(),
                            "transferred": (top1 == target).numpy(),
                            "y_host": y_host,
                            "y_grafted": y,
                            "margin_gain": sign * (y - y_host),
                        },
                        schema=IDENTITY_TRANSFER_EVENTS_SCHEMA,
                    )
                )
    per_event = pa.concat_tables(parts) if parts else IDENTITY_TRANSFER_EVENTS_SCHEMA.empty_table()
    per_event = per_event.sort_by([("host", "ascending"), ("prompt_id", "ascending")])
    return per_event, summarize_transfer(pair, per_event, windows, b, readout, n_resamples, seed)


def summarize_transfer(
    pair: ModelPair,
    per_event: pa.Table,
    windows: Sequence[Window],
    boundary: int,
    readout: str,
    n_resamples: int = 2000,
    seed: int = 23,
) -> pa.Table:
    """Per host x window: transfer rate and mean margin gain with prompt-bootstrap CIs (invalid windows kept)."""
    keys = {"family": pair.family, "pair_id": pair.pair_id, "boundary": boundary, "readout": readout}
    data = per_event.select(["host", "graft", "window_name", "transferred", "margin_gain"]).to_pylist()
    rows = []
    for host in HOSTS:
        for graft, name, span, reason in windows:
            mine = [r for r in data if (r["host"], r["graft"], r["window_name"]) == (host, graft, name)]
            if reason is None and not mine:
                reason = "no diverged events"
            for statistic, column in (("transfer_rate", "transferred"), ("margin_gain", "margin_gain")):
                est = lo = hi = float("nan")
                if reason is None:
                    values = np.array([float(r[column]) for r in mine])
                    est, lo, hi = bootstrap_ci(values, n_resamples, seed)
                rows.append({**keys, "host": host, "graft": graft, "window_name": name, "layer_start": span[0],
                             "layer_stop": span[1], "statistic": statistic, "estimate": est, "ci_low": lo,
                             "ci_high": hi, "n": len(mine), "valid": reason is None, "reason": reason})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=IDENTITY_TRANSFER_SCHEMA)
