"""Guards mediation runs before it intervenes: the quality gate and train/test prompt disjointness.

The engine does not import `saes/`: a dictionary (or a view with `.inner`, like `BranchView`) that
carries `gate_status` is a trained dictionary and must have passed the gate (method section 5.1) unless
`allow_failed_gate`; one that carries `training_prompt_ids` must not have trained on any prompt whose event
mediation tests (method section 5.1: dictionaries train on non-evaluation prompts). Such an overlap is an
error, never a silent exclusion: train the dictionary on the mediation fit split or a separate corpus.
Dictionaries with neither attribute (e.g. `DirectionDictionary`, exact by construction) are not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crosspatch.engine.errors import CrosspatchError


def _inner(d: Any) -> Any:
    """The wrapped dictionary of a view (`BranchView.inner`), else `d` itself."""
    return getattr(d, "inner", d)


def check_dictionaries(
    dictionaries: Sequence[Any], test_prompt_ids: Sequence[str], allow_failed_gate: bool = False
) -> list[dict[str, Any]]:
    """Refuse failed-gate dictionaries (unless allowed) and any whose training prompts meet the test split.

    Returns one record per dictionary for the result's provenance: {dictionary, gate_status,
    overridden, training_prompts (count or None), test_overlap (0)}.
    """
    test = set(test_prompt_ids)
    out = []
    for d in dictionaries:
        inner = _inner(d)
        name = str(getattr(d, "id", None) or getattr(inner, "id", None) or "dictionary")
        status = getattr(inner, "gate_status", None)
        overridden = False
        if status is not None and status != "passed":
            if not allow_failed_gate:
                raise CrosspatchError(
                    f"dictionary {name!r} has quality-gate status {status!r}; mediation refuses it unless "
                    "overridden (allow_failed_gate=True, --allow-failed-gate)"
                )
            overridden = True
        trained = getattr(inner, "training_prompt_ids", None)
        if trained is not None:
            overlap = sorted(test & set(trained))
            if overlap:
                raise CrosspatchError(
                    f"{len(overlap)} of {len(test)} test events come from prompts that trained dictionary "
                    f"{name!r} (e.g. {', '.join(overlap[:3])}); train it on the mediation fit split or a "
                    "separate corpus (dictionaries never see evaluation prompts)"
                )
        out.append(
            {
                "dictionary": name,
                "gate_status": status,
                "overridden": overridden,
                "training_prompts": None if trained is None else len(trained),
                "test_overlap": 0,
            }
        )
    return out
