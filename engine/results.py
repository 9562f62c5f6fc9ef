"""Arrow schemas of every engine result table, in one place.

cells (one row per event x boundary x readout; Y = logit(t_it) - logit(t_pt) at the scored position):
    family, pair_id, prompt_id, category   identify the event (prompt_id unique within a pair)
    pair_label      the pair's human label (pair_id is the unique key: names + hash of paths/revisions)
    n_layers        the pair's depth L (so depth b/L is known from the cells alone)
    headline_boundary  the job's headline boundary of this pair (round(0.6 L) unless the job named one)
    position        generated position of the divergence (0 = first token after the prompt)
    t_pt, t_it      the divergent token ids (PT's and IT's greedy choices)
    boundary        index of the first late block; upstream = residual entering it at every position
    readout         'it' (common-IT norm+unembedding), 'pt' (common-PT) or 'own' (each late stack's own)
    y_ptup_ptlate, y_ptup_itlate, y_itup_ptlate, y_itup_itlate   the four cells Y[upstream, late]
    pt_late_effect  y_ptup_itlate - y_ptup_ptlate   (portable part)
    it_late_effect  y_itup_itlate - y_itup_ptlate   (native-context part)
    interaction     it_late_effect - pt_late_effect
    near_tie        the event's near-tie flag (events table; null in cells written before it existed):
                    summaries add subset 'no_near_tie' (rows with near_tie false) when the column is known

events (one row per prompt, diverged or not): the `DivergenceEvent` fields. `event` names the event
    definition (first_diff, or first_nonformat_diff / first_assistant_marker_diff: engine.event_kinds).
    `diverged` means scored;
    reason 'token_mismatch' marks a divergence the token preflight rejected, `token_check` names the
    failed check (prompt_ids, decode, vocab, mask; see engine/preflight.py), null otherwise.
    gap_pt, gap_it  fp32 logit(own choice) - logit(runner-up over the masked vocabulary) of each model at
                    the divergence step, through the fp32 readout (negative: fp32 would pick another token)
    near_tie        a gap below the threshold (default: bf16's step at that logit magnitude,
                    2^(floor(log2|logit|) - 7); see engine/divergence.py); null where no divergence

summaries (`engine.stats.summarize`; one row per level x pair-or-family x boundary-or-depth x readout x
subset x statistic): level 'pair' (mean over prompts, percentile bootstrap CI), 'family' (unweighted
mean of the family's pairs, normal CI) or 'balanced' (unweighted mean of families, normal CI); `headline`
marks rows at each pair's headline boundary. Interaction rows of pairs carry the sign-flip p-value, the
Holm-adjusted p over the pair's boundaries, and in a sweep the sweep-wide max-statistic p; balanced
interaction rows carry the pooled across-family sign-flip p. Besides the cells and effects, `statistic`
is also 'portable_share' or 'interaction_share' (ratios of means, engine.stats).

Controls of the 2x2 (interpolation, signperm, offmanifold, boundary_margins, commitment, baseline_cells,
baselines, lineage_cells, lineage, recipe_contrasts, anatomy_events, anatomy, closure_cells, closure):
schemas and column comments in engine/control_schemas.py.

feature_acts (event x dictionary x latent, active latents only) and feature_effects (set-level effects of
ablation / rescue with CIs, and per-feature attribution scores): see the schemas' column comments.

forced_tokens, forced_summaries, continuation, continuation_summaries: see the schemas at the end (method §6).

gate_checks (job x dictionary x check): quality-gate checks measured by a job (the causal checks of mediation
and the dictionary's own gate), each with value, threshold and passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # this module stays torch-free (the API process imports it)
    from crosspatch.engine.divergence import DivergenceEvent

CELL_COLUMNS = ("y_ptup_ptlate", "y_ptup_itlate", "y_itup_ptlate", "y_itup_itlate")
EFFECT_COLUMNS = ("pt_late_effect", "it_late_effect", "interaction")

STR, I32, I64, F64, BOOL = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()


def typed(kind: pa.DataType, *names: str) -> list[pa.Field]:
    """Columns `names`, all of Arrow type `kind`: a run of same-typed columns on one line."""
    return [pa.field(name, kind) for name in names]


# Column groups many tables share, spliced in with `*` (a schema list may mix them with plain tuples).
EVENT_ID = typed(STR, "family", "pair_id", "prompt_id", "category")  # one prompt of one pair
EVENT_KEY = [*EVENT_ID, pa.field("position", I32)]  # ... and its scored (divergence) position
SITE = [pa.field("boundary", I32), pa.field("readout", STR)]  # where the 2x2 is cut and read
RUN_KEY = [*typed(STR, "family", "pair_id"), *SITE]  # one pair's run at one site
TOKENS = typed(I64, "t_pt", "t_it")  # the divergent token ids
CI = typed(F64, "ci_low", "ci_high")  # percentile bootstrap (pair) or normal (pooled) 95% CI
ESTIMATE_CI = [pa.field("estimate", F64), *CI]

CELLS_SCHEMA = pa.schema(
    [
        *EVENT_KEY,
        *TOKENS,
        *SITE,
        ("pair_label", STR),
        *typed(I32, "n_layers", "headline_boundary"),
        *typed(F64, *CELL_COLUMNS, *EFFECT_COLUMNS),
        ("near_tie", BOOL),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        *EVENT_ID,
        ("diverged", BOOL),
        *typed(STR, "reason", "token_check"),
        ("position", I32),
        *TOKENS,
        ("n_prompt_tokens", I32),
        *typed(pa.list_(I64), "prompt_ids", "prefix_ids"),
        *typed(STR, "prompt_text", "prefix_text", "t_pt_text", "t_it_text"),
        ("event", STR),  # event definition: first_diff (headline), first_nonformat_diff, ...
        *typed(F64, "gap_pt", "gap_it"),
        ("near_tie", BOOL),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("level", STR),  # 'pair', 'family' or 'balanced'
        ("family", STR),  # null on balanced rows
        ("pair_id", STR),  # null on family and balanced rows
        ("pair_label", STR),
        ("boundary", I32),  # null where the combined pairs' boundaries differ
        ("n_layers", I32),  # null where the combined pairs' depths differ
        ("depth", F64),  # boundary / n_layers (null where they differ)
        ("headline", BOOL),  # at each pair's headline boundary (else a swept or depth-matched row)
        *typed(STR, "readout", "subset", "statistic"),
        *ESTIMATE_CI,
        ("n", I64),  # prompts (summed over pairs on family and balanced rows)
        ("n_pairs", I64),
        # p_value: one-sided sign-flip p (pair interaction rows); p_adjusted: Holm over the pair's
        # boundaries (= p_value for one boundary); p_sweep: sweep-wide p, max statistic over boundaries
        *typed(F64, "p_value", "p_adjusted", "p_sweep"),
        ("n_permutations", I64),  # p-values are >= 1 / (n_permutations + 1)
    ]
)


FEATURE_ACTS_SCHEMA = pa.schema(
    [
        *typed(STR, "family", "pair_id", "prompt_id", "dictionary_id"),
        ("layer", I32),
        ("latent", I64),
        # activation at the scored position in (PT up, IT late) and in (IT up, IT late)
        *typed(F64, "act_ptup", "act_itup"),
        ("attribution", F64),  # attr(II) - attr(PI) for this event (fit split; null on test)
        ("split", STR),  # 'fit' or 'test'
    ]
)

FEATURE_EFFECTS_SCHEMA = pa.schema(
    [
        *typed(STR, "family", "pair_id"),
        ("dictionary_id", STR),  # one id, or comma-joined ids for a multi-layer feature set
        ("layer", I32),  # the latent's layer for per-feature rows; null for set-level rows
        # intervention: ablate_topk, ablate_matched_random, ablate_same_delta_random, rescue_*,
        # ablate_single (one feature, held out), attribution (per-feature score), baseline
        ("intervention", STR),
        ("k", I32),  # real set size; for attribution and ablate_single rows the feature's rank
        ("latent", I64),  # per-feature rows only
        # statistic: interaction_drop, share, it_late_drop, rescue_gain, rescue_fraction,
        # attribution_score, interaction, missing_margin
        ("statistic", STR),
        ("effect", F64),  # null: share/fraction whose denominator CI covers 0, or control unavailable
        *CI,
        ("n", I64),  # events; 0 for an unavailable control
    ]
)

GATE_CHECKS_SCHEMA = pa.schema(
    [
        *typed(STR, "family", "pair_id", "dictionary_id"),
        # check_name: heldout_tokens, fve_it, l0_target, alive_fraction, topk_causal_drop,
        # matched_random_drop, ...
        ("check_name", STR),
        ("value", F64),  # measured value; null when it could not be measured
        ("threshold", F64),
        ("passed", BOOL),
        ("detail", STR),
    ]
)


def event_key_columns(family: str, pair_id: str, events: Sequence[DivergenceEvent]) -> dict[str, list]:
    """The EVENT_KEY columns (family, pair_id, prompt_id, category, position) of `events`, a row each."""
    n = len(events)
    return {
        "family": [family] * n,
        "pair_id": [pair_id] * n,
        "prompt_id": [e.prompt_id for e in events],
        "category": [e.category for e in events],
        "position": [e.position for e in events],
    }


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


def events_from_table(table: pa.Table) -> list:
    """`DivergenceEvent`s back from an events table (e.g. a job's checkpoint parts)."""
    from crosspatch.engine.divergence import DivergenceEvent

    fields = {f for f in DivergenceEvent.__dataclass_fields__}
    return [DivergenceEvent(**{k: v for k, v in row.items() if k in fields}) for row in table.to_pylist()]


# ---- forced-token scoring and constrained continuation (engine/forced.py, engine/continuation.py) ----
# (upstream, late) -> suffix of the continuation cell columns
CONTINUATION_CELL_KEYS: dict[tuple[str, str], str] = {
    ("pt", "pt"): "ptup_ptlate",
    ("pt", "it"): "ptup_itlate",
    ("it", "pt"): "itup_ptlate",
    ("it", "it"): "itup_itlate",
}

CONTINUATION_SCHEMA = pa.schema(
    [
        *EVENT_KEY,
        *SITE,
        ("variant", STR),  # native | same_forced | shuffled_tail
        ("n", I32),  # tail length N
        *typed(F64, *(f"c_{k}" for k in CONTINUATION_CELL_KEYS.values())),  # C_N per cell
        *typed(F64, *(f"tail_{k}" for k in CONTINUATION_CELL_KEYS.values())),  # tail-only C_N per cell
        ("interaction", F64),  # 2x2 contrast of C_N
        ("tail_interaction", F64),  # 2x2 contrast of tail-only C_N (0 at N = 0)
        *typed(pa.list_(I64), "it_candidate", "pt_candidate"),  # t_IT + tail[:N], t_PT + tail[:N]
        *typed(STR, "it_candidate_text", "pt_candidate_text"),
    ]
)

CONTINUATION_SUMMARY_SCHEMA = pa.schema(
    [
        *typed(STR, "pair_id", "variant"),
        ("n", I32),
        ("statistic", STR),  # interaction | tail_interaction
        ("mean", F64),
        *CI,
        ("n_events", I64),
    ]
)

FORCED_SCHEMA = pa.schema(
    [
        *EVENT_KEY,
        ("branch", STR),  # it | pt | rank_matched | class_matched
        ("forced_token", I64),
        ("forced_text", STR),
        ("it_rank", I32),  # rank of the forced token in IT's masked ranking at the event (1 = top)
        ("validator", STR),  # exact_answer | format | refusal | null (not objectively scoreable)
        ("success", BOOL),  # suffix-only (primary); null when not scoreable
        ("success_with_token", BOOL),  # forced token + suffix
        ("n_new_tokens", I32),
        ("stop", STR),  # eos | budget
        ("continuation_ids", pa.list_(I64)),
        ("continuation_text", STR),  # the suffix, decoded with IT's tokenizer
    ]
)

FORCED_SUMMARY_SCHEMA = pa.schema(
    [
        ("level", STR),  # pair | balanced
        ("pair_id", STR),  # null on balanced rows
        ("category", STR),
        ("statistic", STR),  # contrast (it - pt), or success_<branch>
        ("view", STR),  # suffix | with_token
        ("mean", F64),
        *CI,
        ("n_events", I64),  # events scored in both branches
        ("n_families", I32),
    ]
)

# lora_controls (engine/lora.py, method §4.2): one row per trained control; interaction null unless valid
LORA_CONTROL_SCHEMA = pa.schema(
    [
        *typed(STR, "family", "pair_id"),
        ("status", pa.string()),  # valid | not_valid
        ("failed_checks", pa.string()),  # comma-separated: domain_nll, merge_equivalence, generation_health
        ("nll_before", pa.float64()),  # held-out domain NLL (nats/token), base
        ("nll_after", pa.float64()),  # merged control
        ("nll_improvement", pa.float64()),  # (before - after) / before
        ("min_nll_improvement", pa.float64()),  # the gate
        ("merge_max_diff", pa.float64()),  # max |merged - (base + adapter)| logits
        ("distinct_share", pa.float64()),
        ("max_token_share", pa.float64()),
        ("steps", pa.int64()),
        ("interaction", pa.float64()),
        *CI,
        ("n_events", pa.int64()),
    ]
)

# handoff (engine.handoff; method §5.4, §5.5): one row per level x analysis x window-or-alpha x set x statistic.
HANDOFF_SCHEMA = pa.schema(
    [
        ("family", pa.string()),  # null on balanced rows
        ("pair_id", pa.string()),  # null on family / balanced rows
        ("dictionary_id", pa.string()),  # comma-joined ids of the run's dictionaries
        ("level", pa.string()),  # 'pair', 'family' or 'balanced' (engine.stats conventions)
        ("analysis", pa.string()),  # gate, dose, rescue_graft, degrade_graft
        ("window_name", pa.string()),  # graft window name (early, mid, ...); null for gate / dose
        ("window_start", pa.int32()),  # first grafted block (inclusive); null for terminal_entry
        ("window_stop", pa.int32()),  # last grafted block + 1 (exclusive)
        ("boundary", pa.int32()),  # gate / dose: the late boundary b; grafts: the terminal boundary
        ("alpha", pa.float64()),  # dose only
        ("set_kind", pa.string()),  # topk, matched_random, same_delta_random, top_active_noncausal, none
        ("k", pa.int32()),  # set size (the selected top set's real size); null on family / balanced rows
        ("statistic", pa.string()),  # see engine/result_docs.py
        ("effect", pa.float64()),  # null: unavailable control, no finite denominator
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int64()),  # events behind the estimate (0: unavailable)
    ]
)

# feature_upstream (engine.handoff.feature_upstream_table): one row per dictionary x latent.
FEATURE_UPSTREAM_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("dictionary_id", pa.string()),
        ("layer", pa.int32()),
        ("latent", pa.int64()),
        ("split", pa.string()),  # the events summarised ('test': held out from ranking)
        ("mean_act_itup", pa.float64()),  # mean activation in (IT up, IT late), zeros included
        ("mean_act_ptup", pa.float64()),  # mean activation in (PT up, IT late), zeros included
        ("diff", pa.float64()),  # mean paired difference act_itup - act_ptup
        ("ci_low", pa.float64()),  # normal-approximation 95% CI of the paired difference
        ("ci_high", pa.float64()),
        ("n", pa.int64()),  # events of the split (a latent inactive in both cells counts as 0, 0)
    ]
)

# feature pages (engine/feature_pages.py): stored at mediation time so a page needs no model or tokenizer.
# feature_examples: one row per latent x top-activating event (top N by act_itup), decoded
FEATURE_EXAMPLES_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("dictionary_id", pa.string()),
        ("layer", pa.int32()),
        ("latent", pa.int64()),
        ("rank", pa.int32()),  # 0 = the event where the latent fired most (IT up, IT late)
        ("prompt_id", pa.string()),
        ("split", pa.string()),  # 'fit' or 'test'
        ("activation", pa.float64()),  # act_itup
        ("activation_ptup", pa.float64()),  # act_ptup
        ("context_before", pa.string()),  # decoded prompt + shared prefix before the scored token (tail)
        ("token", pa.string()),  # the decoded scored token (last input token)
        ("context_after", pa.string()),  # t_IT decoded
    ]
)

# feature_decoder_tokens: one row per latent x direction (top/bottom) x rank: logit lens of the decoder row
FEATURE_DECODER_TOKENS_SCHEMA = pa.schema(
    [
        ("family", pa.string()),
        ("pair_id", pa.string()),
        ("dictionary_id", pa.string()),
        ("layer", pa.int32()),
        ("latent", pa.int64()),
        ("architecture", pa.string()),  # sae / transcoder / crosscoder
        ("branch", pa.string()),  # the decoder branch read (crosscoders: it)
        ("direction", pa.string()),  # 'top' (promoted) or 'bottom' (suppressed)
        ("rank", pa.int32()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("value", pa.float64()),  # W_dec[latent, branch] . W_U(IT)[token] (no final norm)
        ("pt_decoder_share", pa.float64()),  # crosscoders: |W_pt| / (|W_pt| + |W_it|); null otherwise
    ]
)
