"""Feature mediation: which final-layer dictionary features carry the upstream-dependent IT late effect.

Method (paper §5, as docs/method.md states it), on dictionaries at IT final-MLP outputs (hook `mlp_out`):

- **Splice**: replace an MLP output x by decode(encode(x)) + (x - decode(encode(x))); with no
  intervention that reproduces the clean logits (the no-op every intervention is tested against).
- **Ranking** (fit split): for the two IT-late cells c in {(IT up, IT late), (PT up, IT late)},
  attr_f(c) = a_f * (W_dec[f] . dY/d mlp_out) at the scored (last) position; score_f = attr_f(II) - attr_f(PI),
  averaged over events; keep positive scores, descending.
- **Ablation** (test split): in the two IT-late cells only, at the last position,
  mlp_out -= sum_{f in S} a_f W_dec[f] ("zero"), or set a_f to its PT-upstream value ("pt_value").
  drop = I_full - I_ablate per event; share = mean drop / mean I_full (ratio of means).
- **Rescue**: in (PT up, IT late), mlp_out += alpha (a_f(II) - a_f(current)) W_dec[S]; gain = Y' - Y(PI);
  fraction = mean gain / mean (Y(II) - Y(PI)).
- **Controls** in the same run (`engine.controls`): matched-random sets drawn from a pool that excludes the
  largest top-k set and every positive-score feature (unavailable, and reported so, when the pool is too
  small) and same-delta random vectors (an independent random direction per event with the norm of the
  decoded edit), each with >= 5 seeds.
- **Sets are labelled by their real size**: a requested k with fewer positive-score features becomes a set
  of that many (`MediationResult.k_labels` maps requested to real sizes).
- **Shares** (and rescue fractions) are null where the CI of their denominator (interaction, missing margin)
  covers 0: a share of nothing is not a number.
- **Per-feature held-out drops**: the first `n_single_features` features of the largest set are ablated one at
  a time on the test split (`ablate_single` rows, with CIs), the causal evidence top-features reports.
- The paper's "gate" statistic drop(II) - drop(PI) (§5.4) equals the interaction drop on the same events under
  IT-late-only ablation; `engine/handoff.py` (`MediationConfig.handoff`) reports it on its own support, with the
  rescue dose-response and the MLP-window handoff (§5.5).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.controls import (
    ControlStatus,
    causal_checks,
    control_pool,
    matched_random,
    matched_status,
    random_directions,
)
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
from crosspatch.engine.guards import check_dictionaries
from crosspatch.engine.hooks import HasMlps, MlpHook, mlp_hooks
from crosspatch.engine.mediation_tables import acts_table, effects_table
from crosspatch.engine.noop import check_mediation_noop
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import FEATURE_ACTS_SCHEMA, GATE_CHECKS_SCHEMA

Edit = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# (mlp_out [batch, d_model], mlp_in [batch, d_model], both at the last position; layer) -> new mlp_out


class FeatureDictionary(Protocol):
    """What mediation needs of a dictionary on an IT MLP output (crosscoders: their IT branch)."""

    id: str
    layer: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d_model]` -> `[..., n_latents]` activations."""
        ...

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """`[..., n_latents]` -> `[..., d_model]` reconstruction (IT branch)."""
        ...

    @property
    def W_dec(self) -> torch.Tensor:
        """`[n_latents, d_model]` decoder rows (IT branch)."""
        ...


@dataclass
class DirectionDictionary:
    """A dictionary given by unit decoder rows; encode = ReLU(x . W_dec^T). Exact for orthonormal features."""

    id: str
    layer: int
    directions: torch.Tensor  # [n_latents, d_model]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.directions.to(x).T)  # [..., n_latents]

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.directions.to(acts)  # [..., d_model]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.directions


class MultiBranchDictionary(Protocol):
    """A dictionary with named branches (`saes.load.Dictionary`): what `BranchView` adapts."""

    @property
    def id(self) -> str | None: ...

    @property
    def layer(self) -> int | None: ...

    @property
    def branches(self) -> list[str]: ...

    @property
    def W_dec(self) -> dict[str, torch.Tensor]:
        """Per branch `[n_latents, d_model]` decoder rows."""
        ...

    def encode(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor: ...

    def decode(self, acts: torch.Tensor, branch: str | None = None) -> torch.Tensor: ...


class BranchView:
    """One model branch of a multi-branch dictionary (e.g. `saes.load.Dictionary`) as a `FeatureDictionary`.

    Crosscoders use their IT branch (encoder and decoder of that branch only); single-branch SAEs and
    transcoders use their one branch. Transcoders read the MLP input (`reads_input`).
    """

    def __init__(self, dictionary: MultiBranchDictionary, branch: str = "it") -> None:
        self.inner = dictionary
        branches = list(dictionary.branches)
        self.branch = branch if branch in branches else branches[0] if len(branches) == 1 else None
        if self.branch is None:
            raise CrosspatchError(f"dictionary has branches {branches}, none named {branch!r}")
        self.id = str(dictionary.id or Path(str(getattr(dictionary, "path", "dict"))).name)
        if dictionary.layer is None:
            raise CrosspatchError(f"dictionary {self.id!r} does not say which layer it reads")
        self.layer = int(dictionary.layer)
        self.reads_input = getattr(dictionary, "input_hook", "mlp_out") == "mlp_in"
        self._w = dictionary.W_dec[self.branch]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x, branch=self.branch if len(self.inner.branches) > 1 else None)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(acts, branch=self.branch if len(self.inner.branches) > 1 else None)

    @property
    def W_dec(self) -> torch.Tensor:
        return self._w


@dataclass
class MediationConfig:
    """Knobs of one mediation run (defaults follow the method)."""

    top_k: int = 200
    ks: tuple[int, ...] = (25, 50, 100, 200)
    fit_fraction: float = 0.27  # the method ranks on 160 of 600 prompts
    split_seed: int = 0
    boundary: int | None = None
    ablation: Literal["zero", "pt_value"] = "zero"
    alpha: float = 1.0
    n_random_seeds: int = 5  # seeds of each control (matched-random sets, same-delta directions); >= 5
    neighbours: int = 50
    n_single_features: int = 20  # features of the largest set ablated one at a time (held-out evidence)
    n_resamples: int = 2000
    seed: int = 23
    batch_size: int = 16
    # an explicit (dictionary id, latent) set to test instead of top-k
    features: tuple[tuple[str, int], ...] | None = None
    allow_failed_gate: bool = False  # use trained dictionaries below the quality gate (engine/guards.py)
    handoff: Any = (
        None  # an engine.handoff.HandoffConfig: also run gate, dose-response and grafts (off: None)
    )

    def validate(self, dictionaries: Sequence[FeatureDictionary], pair: ModelPair) -> None:
        if not dictionaries:
            raise CrosspatchError("mediation needs at least one dictionary")
        if self.top_k < 1 or any(k < 1 for k in self.ks):
            raise CrosspatchError("top_k and every k must be >= 1")
        if self.n_random_seeds < 5:
            raise CrosspatchError(f"n_random_seeds {self.n_random_seeds} must be >= 5 (the controls' seeds)")
        if self.neighbours < 1 or self.n_single_features < 0:
            raise CrosspatchError("neighbours must be >= 1 and n_single_features >= 0")
        if not 0.0 < self.fit_fraction < 1.0:
            raise CrosspatchError(f"fit_fraction {self.fit_fraction} must lie in (0, 1)")
        if self.ablation not in ("zero", "pt_value"):
            raise CrosspatchError(f"unknown ablation {self.ablation!r}; choose 'zero' or 'pt_value'")
        b = pair.resolve_boundaries(self.boundary)[0]
        for d in dictionaries:
            if not b <= d.layer < pair.n_layers:
                raise CrosspatchError(
                    f"dictionary {d.id!r} sits at layer {d.layer}, outside the late stack {b}..{pair.n_layers - 1}"
                )
        width = {d.id: d.W_dec.shape[0] for d in dictionaries}
        if self.top_k > sum(width.values()):
            raise CrosspatchError(
                f"top_k {self.top_k} exceeds the dictionaries' {sum(width.values())} latents"
            )


def mlp_edits(pair: ModelPair, edits: dict[int, Edit]) -> contextlib.AbstractContextManager[None]:
    """Hooks that edit IT's MLP output at the last position of the given layers (`engine.hooks`: always removed)."""

    def make(layer: int, edit: Edit) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            B, _, D = out.shape  # [batch, seq, d_model]
            last = edit(out[:, -1], x[:, -1], layer)  # [B, D] at the last position
            assert last.shape == (B, D), f"an edit returns [batch, d_model], got {tuple(last.shape)}"
            new = out.clone()  # [B, seq, D]
            new[:, -1] = last
            return new

        return fn

    return mlp_hooks(pair.it_adapter, {layer: make(layer, edit) for layer, edit in edits.items()})


def _source(d: FeatureDictionary, mlp_out: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
    """What `d` encodes: the MLP input for transcoders, else the MLP output."""
    return mlp_in if getattr(d, "reads_input", False) else mlp_out


def splice_with_error(
    model_adapter: HasMlps, dictionaries: Sequence[FeatureDictionary]
) -> contextlib.AbstractContextManager[None]:
    """Run with each dictionary spliced at its layer's MLP output, keeping the error term (a no-op by design).

    x -> decode(encode(x)) + (x - decode(encode(x))) at every position; interventions edit the first term.
    (`saes.quality.splice_metrics` instead replaces x by the reconstruction alone, to measure its loss.)
    """

    def make(d: FeatureDictionary) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            recon = d.decode(d.encode(_source(d, out, x).to(d.W_dec))).to(out)  # [batch, seq, d_model]
            return recon + (out - recon)

        return fn

    return mlp_hooks(model_adapter, [(d.layer, make(d)) for d in dictionaries])


def it_late_margin(
    pair: ModelPair,
    upstream: str,
    passes: CleanPasses,
    boundary: int,
    tokens: torch.Tensor,
    edits: dict[int, Edit],
) -> torch.Tensor:
    """`[batch]` Y of cell (upstream, IT late) with `edits` applied to IT's MLP outputs (common-IT readout)."""
    resid = passes.captured[upstream][boundary]
    with mlp_edits(pair, edits):
        final = pair.it_adapter.run_layers(resid, passes.contexts["it"], start=boundary)[0][:, -1]
    return margin(pair.it_adapter, final, tokens)


@torch.no_grad()
def it_late_margins(
    pair: ModelPair,
    upstream: str,
    passes: CleanPasses,
    boundary: int,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    runs: Sequence[dict[int, Edit]],
    max_rows: int = 512,
) -> list[torch.Tensor]:
    """`it_late_margin` for many edit sets at once: one `[batch]` Y per entry of `runs`.

    `attention_mask` `[batch, seq]`: the batch's (left-padded) mask, as given to `clean_passes`.
    The runs are stacked along the batch (at most `max_rows` rows per forward), and the blocks before the
    first edited layer run once (the edits touch only later blocks). Equal to calling `it_late_margin` per
    run, up to fp32 rounding of the larger matmuls.
    """
    if not runs:
        return []
    batch = tokens.shape[0]
    edited = sorted({layer for run in runs for layer in run})
    start = min(edited) if edited else pair.n_layers
    resid = passes.captured[upstream][boundary]  # [batch, seq, d_model]
    shared = pair.it_adapter.run_layers(resid, passes.contexts["it"], start=boundary, stop=start)[0]
    per_chunk = max(1, max_rows // max(1, batch))
    out: list[torch.Tensor] = []
    for lo in range(0, len(runs), per_chunk):
        chunk = runs[lo : lo + per_chunk]
        r = len(chunk)
        stacked = shared.repeat(r, 1, 1)  # [r * batch, seq, d_model]
        ctx = pair.it_adapter.context(
            stacked, attention_mask.repeat(r, 1), passes.contexts["it"].position_ids.repeat(r, 1)
        )  # IT's masks and rotary for the stacked rows

        def make(layer: int, chunk: Sequence[dict[int, Edit]] = chunk) -> Edit:
            def edit(x: torch.Tensor, x_in: torch.Tensor, _layer: int) -> torch.Tensor:
                parts = []
                for i, run in enumerate(chunk):
                    rows = slice(i * batch, (i + 1) * batch)
                    parts.append(run[layer](x[rows], x_in[rows], layer) if layer in run else x[rows])
                return torch.cat(parts)  # [r * batch, d_model]

            return edit

        with mlp_edits(pair, {layer: make(layer) for layer in edited}):
            final = pair.it_adapter.run_layers(stacked, ctx, start=start)[0][:, -1]  # [r * batch, d_model]
        y = margin(pair.it_adapter, final, tokens.repeat(r, 1))  # [r * batch]
        out += list(y.split(batch))
    return out


def _capture_mlp(
    pair: ModelPair,
    upstream: str,
    passes: CleanPasses,
    boundary: int,
    tokens: torch.Tensor,
    layers: Sequence[int],
    with_grad: bool,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
    """(MLP output, MLP input) at the last position of `layers` in cell (upstream, IT late); dY/d output if `with_grad`."""
    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}

    def make(layer: int) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> None:
            if with_grad:
                out.retain_grad()
            outs[layer], ins[layer] = out, x  # 2x [batch, seq, d_model]

        return fn

    resid = passes.captured[upstream][boundary].detach()  # [batch, seq, d_model]
    with (
        mlp_hooks(pair.it_adapter, {layer: make(layer) for layer in layers}),
        torch.set_grad_enabled(with_grad),
    ):
        if with_grad:
            resid = resid.clone().requires_grad_(True)  # makes the graph differentiable (weights are frozen)
        final = pair.it_adapter.run_layers(resid, passes.contexts["it"], start=boundary)[0][:, -1]
        y = margin(pair.it_adapter, final, tokens)  # [batch]
        if with_grad:
            y.sum().backward()  # rows are independent, so each row gets its own gradient
    acts = {
        layer: (o[:, -1].detach(), ins[layer][:, -1].detach()) for layer, o in outs.items()
    }  # 2x [batch, d]
    grads = {layer: o.grad[:, -1].detach() for layer, o in outs.items()} if with_grad else {}
    return acts, grads


def split_events(events: Sequence[DivergenceEvent], fit_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded fit/test split over diverged events (by prompt), stratified by the IT token; returns (fit, test).

    Events are grouped by t_IT (groups in seeded random order, events shuffled within each) and every
    1/fit_fraction-th from a random offset goes to fit, so each IT token meets the fit split in proportion,
    within one event: a small fit split cannot leave a token out of the ranking or crowd it with another.
    With all-distinct IT tokens (a real pair's usual case) this is a seeded random split.
    """
    scored = sorted((e for e in events if e.diverged), key=lambda e: e.prompt_id)
    if len(scored) < 4:
        raise CrosspatchError(f"mediation needs at least 4 diverged events, got {len(scored)}")
    rng = random.Random(seed)
    strata: dict[int, list[DivergenceEvent]] = {}
    for e in scored:
        strata.setdefault(e.t_it, []).append(e)
    tokens = sorted(strata)
    rng.shuffle(tokens)
    order: list[DivergenceEvent] = []
    for t in tokens:
        block = strata[t][:]
        rng.shuffle(block)
        order += block
    n, n_fit = len(order), max(1, round(fit_fraction * len(order)))
    offset = rng.random()
    fit = {order[int((i + offset) * n / n_fit)].prompt_id for i in range(n_fit)}  # systematic sample
    return [e for e in scored if e.prompt_id in fit], [e for e in scored if e.prompt_id not in fit]


@dataclass
class FeatureRanking:
    """Per (dictionary, latent) scores from the fit split, plus what matched controls need."""

    keys: list[tuple[str, int]]  # (dictionary id, latent), all latents of all dictionaries
    score: np.ndarray  # [n_features] mean attr(II) - attr(PI)
    active_rate: np.ndarray  # [n_features] fraction of fit events where the latent fires in either cell
    n_events: int
    acts: list[pa.Table] = field(default_factory=list)  # feature_acts rows of the fit split

    def top(self, k: int) -> list[int]:
        order = np.argsort(-self.score, kind="stable")
        return [int(i) for i in order[:k] if self.score[i] > 0]


def _feature_index(dictionaries: Sequence[FeatureDictionary]) -> list[tuple[str, int]]:
    return [(d.id, i) for d in dictionaries for i in range(d.W_dec.shape[0])]


@torch.no_grad()
def _acts(d: FeatureDictionary, site: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`d`'s activations at a captured (mlp_out, mlp_in) site: `[batch, n_latents]`."""
    x = _source(d, *site)
    return d.encode(x.to(d.W_dec.device, d.W_dec.dtype)).float()


def rank_features(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    dictionaries: Sequence[FeatureDictionary],
    cfg: MediationConfig,
    record_acts: bool = True,
) -> FeatureRanking:
    """Gradient x activation attribution of every latent to the II - PI margin in the IT late stack."""
    b = pair.resolve_boundaries(cfg.boundary)[0]
    layers = sorted({d.layer for d in dictionaries})
    keys = _feature_index(dictionaries)
    total = np.zeros(len(keys))
    active = np.zeros(len(keys))
    tables: list[pa.Table] = []
    n = 0
    for batch, ids, mask, tokens in event_batches(pair, events, cfg.batch_size):
        passes = clean_passes(pair, ids, mask, [b])
        per_cell = {}
        for up in ("it", "pt"):
            outs, grads = _capture_mlp(pair, up, passes, b, tokens, layers, with_grad=True)
            per_cell[up] = {}
            for d in dictionaries:
                a = _acts(d, outs[d.layer])  # [batch, n_latents]
                g = grads[d.layer].to(d.W_dec) @ d.W_dec.T  # [batch, n_latents]: W_dec[f] . dY/dx
                per_cell[up][d.id] = (a, a * g.float())
        offset = 0
        for d in dictionaries:
            a_ii, attr_ii = per_cell["it"][d.id]
            a_pi, attr_pi = per_cell["pt"][d.id]
            score = (attr_ii - attr_pi).cpu().numpy()  # [batch, n_latents]
            width = score.shape[1]
            total[offset : offset + width] += score.sum(0)
            fired = ((a_ii > 0) | (a_pi > 0)).cpu().numpy()
            active[offset : offset + width] += fired.sum(0)
            if record_acts:
                tables.append(
                    acts_table(pair, batch, d, a_ii.cpu().numpy(), a_pi.cpu().numpy(), "fit", score)
                )
            offset += width
        n += len(batch)
    if n == 0:
        raise CrosspatchError("no diverged events in the fit split")
    return FeatureRanking(keys=keys, score=total / n, active_rate=active / n, n_events=n, acts=tables)


def _by_layer(
    features: Sequence[int], ranking: FeatureRanking, dictionaries: Sequence[FeatureDictionary]
) -> dict[int, list[tuple[FeatureDictionary, torch.Tensor]]]:
    """Group global feature indices into (dictionary, latent index tensor) per layer."""
    by_dict: dict[str, list[int]] = {}
    for f in features:
        dict_id, latent = ranking.keys[f]
        by_dict.setdefault(dict_id, []).append(latent)
    out: dict[int, list] = {}
    for d in dictionaries:
        if d.id in by_dict:
            out.setdefault(d.layer, []).append((d, torch.tensor(by_dict[d.id], device=d.W_dec.device)))
    return out


Directions = dict[int, torch.Tensor] | None  # per layer `[batch, d_model]` unit vectors (same-delta control)


def _ablate_edit(groups, target: dict[int, dict[str, torch.Tensor]] | None, directions: Directions) -> Edit:
    """mlp_out -= sum_S (a_f - target_f) W_dec[f] (target 0 = "zero"); or a random direction of that norm."""

    def edit(x: torch.Tensor, x_in: torch.Tensor, layer: int) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for d, idx in groups.get(layer, []):
            a = d.encode(_source(d, x, x_in).to(d.W_dec))[:, idx]  # [batch, |S|]
            if target is not None:
                a = a - target[layer][d.id][:, idx].to(a)
            delta = delta + (a @ d.W_dec[idx]).to(x)  # [batch, d_model]
        if directions is not None:
            delta = directions[layer].to(x) * delta.norm(dim=-1, keepdim=True)  # [batch, d_model]
        return x - delta

    return edit


def _rescue_edit(
    groups, target: dict[int, dict[str, torch.Tensor]], alpha: float, directions: Directions
) -> Edit:
    """mlp_out += alpha (a_f(II) - a_f(current)) W_dec[S]; or a random direction of that norm."""

    def edit(x: torch.Tensor, x_in: torch.Tensor, layer: int) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for d, idx in groups.get(layer, []):
            a = d.encode(_source(d, x, x_in).to(d.W_dec))[:, idx]
            delta = delta + ((target[layer][d.id][:, idx].to(a) - a) @ d.W_dec[idx]).to(x)
        if directions is not None:
            delta = directions[layer].to(x) * delta.norm(dim=-1, keepdim=True)  # [batch, d_model]
        return x + alpha * delta

    return edit


def _dict_acts(
    sites: dict[int, tuple[torch.Tensor, torch.Tensor]], dictionaries
) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for d in dictionaries:
        out.setdefault(d.layer, {})[d.id] = _acts(d, sites[d.layer])
    return out


@dataclass
class MediationResult:
    """Everything one mediation run produces: tables for DuckDB, the config/split it used, controls and checks."""

    effects: pa.Table  # FEATURE_EFFECTS_SCHEMA
    feature_acts: pa.Table  # FEATURE_ACTS_SCHEMA
    ranking: FeatureRanking
    config: dict
    fit_ids: list[str]
    test_ids: list[str]
    noop: dict | None = None  # runtime no-op check on the first batch (engine.noop), incl. the splice
    dictionary_checks: list[dict] = field(default_factory=list)  # gate status / override, prompt disjointness
    k_labels: list[dict] = field(default_factory=list)  # {"requested": k, "size": real set size}
    # (kind, size, seed) -> (dictionary id, latent) of every tested set, controls included
    sets: dict[tuple[str, int, int], list[tuple[str, int]]] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)  # per control: seeds, status per size, pool
    # causal gate checks {name, value, threshold, passed, k, detail}
    checks: list[dict] = field(default_factory=list)
    handoff: Any = None  # engine.handoff.HandoffResult when `MediationConfig.handoff` is set

    def checks_table(self, pair: ModelPair) -> pa.Table:
        """The causal checks as GATE_CHECKS_SCHEMA rows, one per dictionary of the run."""
        dict_ids = sorted({key[0] for key in self.ranking.keys})
        rows = [
            dict(
                family=pair.family,
                pair_id=pair.pair_id,
                dictionary_id=d,
                check_name=c["name"],
                value=c["value"],
                threshold=c["threshold"],
                passed=c["passed"],
                detail=c["detail"],
            )
            for d in dict_ids
            for c in self.checks
        ]
        return pa.Table.from_pylist(rows, schema=GATE_CHECKS_SCHEMA)


def _labelled_sets(ranking: FeatureRanking, cfg: MediationConfig) -> tuple[dict[int, list[int]], list[dict]]:
    """Top sets keyed by their real size (a k with fewer positive-score features shrinks), and the labels."""
    if cfg.features is not None:
        index = {key: i for i, key in enumerate(ranking.keys)}
        unknown = [f for f in cfg.features if tuple(f) not in index]
        if unknown:
            raise CrosspatchError(
                f"features {unknown[:3]} are not (dictionary id, latent) pairs of these dictionaries"
            )
        chosen = {len(cfg.features): [index[tuple(f)] for f in cfg.features]}
    else:
        ks = sorted({k for k in (*cfg.ks, cfg.top_k) if k <= cfg.top_k})
        chosen = {k: ranking.top(k) for k in ks}
    sets: dict[int, list[int]] = {}
    labels = []
    for k, top in chosen.items():
        labels.append({"requested": k, "size": len(top)})
        if top:
            sets.setdefault(len(top), top)
    return sets, labels


def mediate(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    dictionaries: Sequence[FeatureDictionary],
    cfg: MediationConfig | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> MediationResult:
    """Rank features on the fit split; ablate / rescue top-k and controls on the test split."""
    cfg = cfg or MediationConfig()
    cfg.validate(dictionaries, pair)
    b = pair.resolve_boundaries(cfg.boundary)[0]
    fit, test = split_events(events, cfg.fit_fraction, cfg.split_seed)
    dictionary_checks = check_dictionaries(dictionaries, [e.prompt_id for e in test], cfg.allow_failed_gate)
    noop = check_mediation_noop(pair, events, dictionaries, b, cfg.batch_size)  # raises NoopCheckError
    ranking = rank_features(pair, fit, dictionaries, cfg)
    if on_progress:
        on_progress(f"ranked {len(ranking.keys)} latents on {len(fit)} fit events")
    chosen, k_labels = _labelled_sets(ranking, cfg)
    for lab in k_labels:
        if lab["size"] != lab["requested"] and on_progress:
            on_progress(
                f"k={lab['requested']}: only {lab['size']} features have a positive score; labelled {lab['size']}"
            )
    largest = chosen[max(chosen)] if chosen else []
    pool = control_pool(ranking.keys, ranking.score, ranking.active_rate, largest)
    match_key = ranking.active_rate * np.abs(ranking.score)
    seeds = list(range(cfg.n_random_seeds))
    # a run: (mode-independent set kind, size, seed) -> (features, same-delta seed or None)
    runs: dict[tuple[str, int, int], tuple[list[int], int | None]] = {}
    status: dict[int, ControlStatus] = {}
    for k, top in chosen.items():
        runs[("topk", k, 0)] = (top, None)
        for s in seeds:
            runs[("same_delta_random", k, s)] = (top, 7919 * k + s)
        status[k] = matched_status(ranking.keys, top, pool, cfg.neighbours, k)
        if status[k].available:
            status[k].seeds = [1000 * k + s for s in seeds]
            for s, seed in zip(seeds, status[k].seeds, strict=True):
                drawn = matched_random(ranking.keys, match_key, top, pool, seed, cfg.neighbours)
                runs[("matched_random", k, s)] = (drawn, None)
                status[k].drawn.append([ranking.keys[f] for f in drawn])  # recorded: auditable draws
        elif on_progress:
            on_progress(f"matched-random control unavailable: {status[k].reason}")
    singles = largest[: cfg.n_single_features]
    for f in singles:
        runs[("single", f, 0)] = ([f], None)
    layers = sorted({d.layer for d in dictionaries})
    per_event: dict[tuple[str, str, int, int, str], list[float]] = {}  # (mode, kind, k, seed, statistic)
    base: dict[str, list[float]] = {"interaction": [], "it_late_effect": [], "missing_margin": []}
    test_acts: list[pa.Table] = []
    for batch, ids, mask, tokens in event_batches(pair, test, cfg.batch_size):
        passes = clean_passes(pair, ids, mask, [b])
        # the 2x2 under the common IT readout, from the clean passes above: {(upstream, late): [batch]}
        cells = crosspatch_batch(pair, ids, mask, tokens[:, 1], tokens[:, 0], [b], ("it",), passes)[(b, "it")]
        y = {cell: cells[column] for cell, column in CELLS.items()}
        interaction = (y["it", "it"] - y["it", "pt"]) - (y["pt", "it"] - y["pt", "pt"])
        base["interaction"] += interaction.tolist()
        base["it_late_effect"] += (y["it", "it"] - y["it", "pt"]).tolist()
        base["missing_margin"] += (y["it", "it"] - y["pt", "it"]).tolist()
        outs_ii, _ = _capture_mlp(pair, "it", passes, b, tokens, layers, with_grad=False)
        outs_pi, _ = _capture_mlp(pair, "pt", passes, b, tokens, layers, with_grad=False)
        acts_ii, acts_pi = _dict_acts(outs_ii, dictionaries), _dict_acts(outs_pi, dictionaries)
        test_acts += [
            acts_table(
                pair,
                batch,
                d,
                acts_ii[d.layer][d.id].cpu().numpy(),
                acts_pi[d.layer][d.id].cpu().numpy(),
                "test",
            )
            for d in dictionaries
        ]
        prompt_ids = [e.prompt_id for e in batch]
        d_model = pair.it_adapter.d_model
        # every run's edits, then one stacked forward per kind of pass (ablate II, ablate PI, rescue PI)
        target = acts_pi if cfg.ablation == "pt_value" else None
        ablate_ii, ablate_pi, rescue = [], [], []
        for (kind, _k, _s), (features, sd) in runs.items():
            groups = _by_layer(features, ranking, dictionaries)
            # per layer `[batch, d_model]` unit directions of the same-delta control, else None
            dirs = None if sd is None else {L: random_directions(prompt_ids, sd, L, d_model) for L in groups}
            ablate_ii.append({L: _ablate_edit(groups, target, dirs) for L in groups})
            ablate_pi.append({L: _ablate_edit(groups, None, dirs) for L in groups})
            if kind != "single":
                rescue.append({L: _rescue_edit(groups, acts_ii, cfg.alpha, dirs) for L in groups})
        y_ii = it_late_margins(pair, "it", passes, b, tokens, mask, ablate_ii)
        y_pi = (
            [y["pt", "it"]] * len(runs)
            if cfg.ablation == "pt_value"
            else it_late_margins(pair, "pt", passes, b, tokens, mask, ablate_pi)
        )
        y_rescued = iter(it_late_margins(pair, "pt", passes, b, tokens, mask, rescue))
        for (kind, k, s), ii, pi in zip(runs, y_ii, y_pi, strict=True):
            i_abl = (ii - y["it", "pt"]) - (pi - y["pt", "pt"])
            _add(per_event, ("ablate", kind, k, s, "interaction_drop"), (interaction - i_abl).tolist())
            if kind == "single":
                continue
            _add(per_event, ("ablate", kind, k, s, "it_late_drop"), (y["it", "it"] - ii).tolist())
            _add(per_event, ("rescue", kind, k, s, "rescue_gain"), (next(y_rescued) - y["pt", "it"]).tolist())
        if on_progress:
            on_progress(f"intervened on {len(base['interaction'])}/{len(test)} test events")
    top_k = max(chosen) if chosen else None
    checks = causal_checks(
        top_k,
        np.array(per_event[("ablate", "topk", top_k, 0, "interaction_drop")]) if top_k else None,
        [np.array(per_event[("ablate", "matched_random", top_k, s, "interaction_drop")]) for s in seeds]
        if top_k and status[top_k].available
        else [],
        np.array(base["interaction"]),
        status.get(top_k) if top_k else None,
    )
    effects = effects_table(pair, dictionaries, per_event, base, ranking, cfg, status)
    handoff = None
    if cfg.handoff is not None and largest:
        from crosspatch.engine.handoff import run_handoff  # imports this module

        handoff = run_handoff(pair, test, dictionaries, ranking, largest, cfg, cfg.handoff, on_progress)
    acts = pa.concat_tables([FEATURE_ACTS_SCHEMA.empty_table(), *ranking.acts, *test_acts])
    return MediationResult(
        effects=effects,
        feature_acts=acts,
        ranking=ranking,
        config=asdict(cfg),
        fit_ids=[e.prompt_id for e in fit],
        test_ids=[e.prompt_id for e in test],
        dictionary_checks=dictionary_checks,
        noop=noop.to_dict() if noop else None,
        k_labels=k_labels,
        sets={
            key: [ranking.keys[f] for f in feats] for key, (feats, _) in runs.items() if key[0] != "single"
        },
        controls={
            "matched_random": {
                "neighbours": cfg.neighbours,
                "pool": {d: len(v) for d, v in pool.by_dict.items()},
                "excluded": {
                    "largest_top_set": pool.excluded_top,
                    "positive_score": pool.excluded_positive,
                    "never_active": pool.excluded_silent,
                },
                "by_k": {k: asdict(st) for k, st in status.items()},
            },
            "same_delta_random": {"seeds": {k: [7919 * k + s for s in seeds] for k in chosen}},
        },
        checks=checks,
        handoff=handoff,
    )


def _add(
    store: dict[tuple[str, str, int, int, str], list[float]],
    key: tuple[str, str, int, int, str],
    values: list[float],
) -> None:
    store.setdefault(key, []).extend(values)
