"""Mediation controls that cannot draw the signal, and the two causal checks of the quality gate.

Method (docs/method.md, "Feature mediation"; paper §5.1, §5.3):

- **Matched-random** sets: each selected feature is swapped for a random feature of the same dictionary
  among its `neighbours` nearest by activation rate x |score| (fit split). The pool excludes every feature of
  the *largest* top-k set being tested, every feature with a positive fit-split score (a candidate mediator
  is not a control) and every feature that never fired on the fit split (ablating it is a no-op by
  construction). Draws are without replacement within a set, so every draw needs `neighbours` candidates:
  the pool of dictionary d must hold at least |S_d| + neighbours - 1 features, else the control is
  **unavailable** and reported as such (never a number drawn from a smaller, contaminated pool).
- **Same-delta random** vectors: per event, one random unit direction (a function of the seed, the event's
  prompt id and the layer only, so independent across events and seeds and the same whatever the batching),
  scaled per cell to the norm of the decoded edit it replaces.
- **Causal gate checks** (paper §5.1): `topk_causal_drop` (mean top-k interaction drop > 0) and
  `matched_random_drop` (mean matched-random interaction drop <= 0.05, logit units, signed as the paper
  states it), measured at the largest tested set.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_MATCHED_RANDOM_DROP = 0.05  # paper §5.1: "matched-random drop <= 0.05"


@dataclass
class ControlPool:
    """Features a matched-random control may draw: per dictionary id, global feature indices."""

    by_dict: dict[str, list[int]]
    excluded_top: int  # features of the largest tested set
    excluded_positive: int  # other features with a positive fit-split score
    excluded_silent: int  # features that never fired on the fit split

    def size(self, dict_id: str) -> int:
        return len(self.by_dict.get(dict_id, []))


@dataclass
class ControlStatus:
    """Whether a matched-random control at one set size could be drawn, and why not."""

    k: int
    available: bool
    reason: str = ""
    seeds: list[int] = field(default_factory=list)
    pool_sizes: dict[str, int] = field(default_factory=dict)  # per dictionary id
    drawn: list[list[tuple[str, int]]] = field(default_factory=list)  # per seed: (dict id, latent)


def control_pool(
    keys: Sequence[tuple[str, int]], score: np.ndarray, active_rate: np.ndarray, largest: Sequence[int]
) -> ControlPool:
    """The matched-random pool: not in `largest`, score <= 0 on the fit split, fired at least once."""
    top = set(largest)
    by_dict: dict[str, list[int]] = {}
    positive = silent = 0
    for i, (dict_id, _) in enumerate(keys):
        if i in top:
            continue
        if score[i] > 0:
            positive += 1
        elif active_rate[i] <= 0:
            silent += 1
        else:
            by_dict.setdefault(dict_id, []).append(i)
    return ControlPool(by_dict, excluded_top=len(top), excluded_positive=positive, excluded_silent=silent)


def matched_status(
    keys: Sequence[tuple[str, int]], selected: Sequence[int], pool: ControlPool, neighbours: int, k: int
) -> ControlStatus:
    """Available iff every dictionary's pool holds |S_d| + neighbours - 1 features (full choice per draw)."""
    need = Counter(keys[f][0] for f in selected)
    sizes = {d: pool.size(d) for d in need}
    short = {d: (sizes[d], n + neighbours - 1) for d, n in need.items() if sizes[d] < n + neighbours - 1}
    if not short:
        return ControlStatus(k=k, available=True, pool_sizes=sizes)
    detail = "; ".join(
        f"dictionary {d!r} has {have} eligible latents, needs {want}" for d, (have, want) in short.items()
    )
    reason = (
        f"matched-random pool too small at k={k}: {detail} ({len(selected)} selected, {neighbours} neighbours each; "
        f"excluded: {pool.excluded_top} in the largest top set, {pool.excluded_positive} with positive score, "
        f"{pool.excluded_silent} never active)"
    )
    return ControlStatus(k=k, available=False, reason=reason, pool_sizes=sizes)


def matched_random(
    keys: Sequence[tuple[str, int]],
    match_key: np.ndarray,
    selected: Sequence[int],
    pool: ControlPool,
    seed: int,
    neighbours: int,
) -> list[int]:
    """For each selected feature, a random pool feature of its dictionary among its `neighbours` nearest by `match_key`.

    Draws without replacement within the set; the caller checks availability first (`matched_status`).
    """
    rng = random.Random(seed)
    taken: set[int] = set()
    out = []
    for f in selected:
        candidates = [i for i in pool.by_dict.get(keys[f][0], []) if i not in taken]
        candidates.sort(key=lambda i: (abs(match_key[i] - match_key[f]), i))
        if len(candidates) < neighbours:
            raise AssertionError("matched_random called on an unavailable pool")  # checked by matched_status
        choice = rng.choice(candidates[:neighbours])
        taken.add(choice)
        out.append(choice)
    return out


def random_directions(prompt_ids: Sequence[str], seed: int, layer: int, d_model: int) -> torch.Tensor:
    """`[batch, d_model]` unit directions, one per event, from (seed, prompt id, layer) alone."""
    rows = []
    for pid in prompt_ids:
        digest = hashlib.blake2b(f"{seed}\x00{layer}\x00{pid}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        rows.append(torch.randn(d_model, generator=g))
    r = torch.stack(rows)  # [batch, d_model]
    return r / r.norm(dim=-1, keepdim=True)


def causal_checks(
    k: int | None,
    topk_drop: np.ndarray | None,
    matched_drops: list[np.ndarray],
    interaction: np.ndarray,
    matched: ControlStatus | None,
) -> list[dict]:
    """The two causal gate checks as plain dicts {name, value, threshold, passed, k, detail}.

    `topk_drop` and each of `matched_drops` (one per seed) are per-event interaction drops `[n_test]`.
    """
    i_mean = float(np.mean(interaction)) if len(interaction) else 0.0
    if topk_drop is None:
        causal = dict(
            name="topk_causal_drop",
            value=None,
            threshold=0.0,
            passed=False,
            k=None,
            detail="no feature has a positive fit-split score: nothing to ablate",
        )
    else:
        v = float(np.mean(topk_drop))
        causal = dict(
            name="topk_causal_drop",
            value=v,
            threshold=0.0,
            passed=v > 0.0,
            k=k,
            detail=f"mean top-{k} interaction drop {v:+.4g} (must be > 0)",
        )
    if matched is None or not matched.available or not matched_drops:
        reason = matched.reason if matched is not None else "no top set to match"
        control = dict(
            name="matched_random_drop",
            value=None,
            threshold=MAX_MATCHED_RANDOM_DROP,
            passed=False,
            k=k,
            detail=f"unavailable: {reason}",
        )
    else:
        v = float(np.mean(np.mean(matched_drops, axis=0)))  # seeds averaged per event, then events
        share = f", {v / i_mean:+.1%} of the interaction" if abs(i_mean) > 1e-12 else ""
        control = dict(
            name="matched_random_drop",
            value=v,
            threshold=MAX_MATCHED_RANDOM_DROP,
            passed=v <= MAX_MATCHED_RANDOM_DROP,
            k=k,
            detail=f"mean matched-random interaction drop {v:+.4g} over {len(matched_drops)} seeds{share} (must be <= 0.05)",
        )
    return [causal, control]
