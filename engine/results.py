"""Arrow schemas of every engine result table, in one place.

cells (one row per event x boundary x readout; Y = logit(t_it) - logit(t_pt) at the scored position):
    family, pair_id, prompt_id, category   identify the event (prompt_id unique within a pair)
    position        generated position of the divergence (0 = first token after the prompt)
    t_pt, t_it      the divergent token ids (PT's and IT's greedy choices)
    boundary        index of the first late block; upstream = residual entering it at every position
    readout         'it' (common-IT norm+unembedding), 'pt' (common-PT) or 'own' (each late stack's own)
    y_ptup_ptlate, y_ptup_itlate, y_itup_ptlate, y_itup_itlate   the four cells Y[upstream, late]
    pt_late_effect  y_ptup_itlate - y_ptup_ptlate   (portable part)
    it_late_effect  y_itup_itlate - y_itup_ptlate   (native-context part)
    interaction     it_late_effect - pt_late_effect

events (one row per prompt, diverged or not): the `DivergenceEvent` fields.

summaries (one row per family x boundary x readout x subset x statistic): estimate with percentile
bootstrap CI over prompts, n, and for the interaction the sign-flip permutation p-value.
"""

from __future__ import annotations

import pyarrow as pa

CELL_COLUMNS = ("y_ptup_ptlate", "y_ptup_itlate", "y_itup_ptlate", "y_itup_itlate")
EFFECT_COLUMNS = ("pt_late_effect", "it_late_effect", "interaction")

CELLS_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("position", pa.int32()),
        ("t_pt", pa.int64()),
        ("t_it", pa.int64()),
        ("boundary", pa.int32()),
        ("readout", pa.string()),
        *[(c, pa.float64()) for c in CELL_COLUMNS],
        *[(c, pa.float64()) for c in EFFECT_COLUMNS],
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("diverged", pa.bool_()),
        ("reason", pa.string()),
        ("position", pa.int32()),
        ("t_pt", pa.int64()),
        ("t_it", pa.int64()),
        ("n_prompt_tokens", pa.int32()),
        ("prefix_ids", pa.list_(pa.int64())),
        ("prompt_text", pa.string()),
        ("prefix_text", pa.string()),
        ("t_pt_text", pa.string()),
        ("t_it_text", pa.string()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("boundary", pa.int32()),
        ("readout", pa.string()),
        ("subset", pa.string()),
        ("statistic", pa.string()),
        ("estimate", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int64()),
        ("p_value", pa.float64()),
    ]
)


def events_table(events: list, family: str, pair_id: str) -> pa.Table:
    """Arrow table of `DivergenceEvent`s (see EVENTS_SCHEMA)."""
    rows = {name: [] for name in EVENTS_SCHEMA.names}
    for e in events:
        rows["family"].append(family)
        rows["pair_id"].append(pair_id)
        rows["n_prompt_tokens"].append(len(e.prompt_ids))
        for name in EVENTS_SCHEMA.names:
            if name not in ("family", "pair_id", "n_prompt_tokens"):
                rows[name].append(getattr(e, name))
    return pa.table(rows, schema=EVENTS_SCHEMA)
