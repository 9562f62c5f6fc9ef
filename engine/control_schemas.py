"""Arrow schemas of the 2x2 controls' result tables (torch-free: the API process imports them).

The engine modules (offmanifold, commitment, baselines, recipe) compute the rows; see their docstrings.
"""

from __future__ import annotations

import pyarrow as pa

from crosspatch.engine.results import (
    BOOL,
    CELLS_SCHEMA,
    CI,
    ESTIMATE_CI,
    EVENT_KEY,
    F64,
    I32,
    I64,
    RUN_KEY,
    SITE,
    STR,
    typed,
)

# one pair's run of a control: the leading columns of every per-run summary table
_RUN_FIELDS = RUN_KEY
# one base model's lineage sweep at one site: the leading columns of the recipe tables
_LINEAGE_FIELDS = [*typed(STR, "family", "base_id"), *SITE]

# ---- engine.offmanifold ------------------------------------------------------------

_EVENT_FIELDS = [*EVENT_KEY, *SITE]  # one event of one run

# interpolation: one row per event x alpha.
#   alpha        interpolation weight a of U_IT in U(a) = (1 - a) U_PT + a U_IT
#   y_itlate     Y(U(a), L_IT);  y_ptlate  Y(U(a), L_PT)
#   late_effect  L(a) = y_itlate - y_ptlate
#   contrast     C(a) = L(a) - L(0): 0 at a = 0, the event's interaction at a = 1
INTERPOLATION_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        *typed(F64, "alpha", "y_itlate", "y_ptlate", "late_effect", "contrast"),
    ]
)

# signperm: one row per event x seed.
#   seed                  the draw of the signed permutation P_s
#   y_itlate, y_ptlate    Y(U_rand, L_IT), Y(U_rand, L_PT) with U_rand = U_PT + P_s(U_IT - U_PT)
#   random_interaction    (y_itlate - y_ptlate) - PT-upstream late effect
#   observed_interaction  the event's 2x2 interaction (same for every seed)
SIGNPERM_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        ("seed", I64),
        *typed(F64, "y_itlate", "y_ptlate", "random_interaction", "observed_interaction"),
    ]
)

# offmanifold (summary): one row per statistic of one pair x boundary x readout.
#   statistic   'slope' (mean per-event slope of C(a), bootstrap CI), 'curve' (mean C(a) at `alpha`, no CI),
#               'interaction' (mean C(1)), 'random_interaction' (signed-permutation mean over events and
#               seeds), 'signperm_ratio' (random / observed interaction, ratio of means with its CI)
#   alpha       the grid point of a 'curve' row (null otherwise)
OFFMANIFOLD_SUMMARY_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        ("statistic", STR),
        ("alpha", F64),
        *ESTIMATE_CI,
        ("n", I64),
    ]
)


# ---- engine.commitment ------------------------------------------------------------

# boundary_margins: one row per event.
#   boundary         index of the first late block
#   boundary_margin  IT logit lens at the boundary: t_IT minus t_PT logit (IT final norm + unembedding)
#   favours_it       boundary_margin > 0 (IT's boundary readout already prefers t_IT)
BOUNDARY_MARGIN_SCHEMA = pa.schema(
    [
        *EVENT_KEY,
        ("boundary", I32),
        ("boundary_margin", F64),
        ("favours_it", BOOL),
    ]
)

# commitment: one row per view of the interaction.
#   view          'all', 'uncommitted' (margin <= 0), 'committed' (margin > 0), 'bin' (margin in
#                 [margin_low, margin_high), the last bin closed) or 'intercept' (a of the linear fit)
#   margin_low, margin_high   the view's margin range (null for all / intercept)
#   estimate, ci_low, ci_high mean interaction (or the intercept) with its percentile bootstrap CI
#   n             events in the view
COMMITMENT_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        ("view", STR),
        *typed(F64, "margin_low", "margin_high"),
        *ESTIMATE_CI,
        ("n", I64),
    ]
)


# ---- engine.baselines ------------------------------------------------------------

# baseline cells: the cells table (engine.results.CELLS_SCHEMA) plus
#   condition   one of CONDITIONS; `position` is the scored prefix length in generated tokens
BASELINE_CELLS_SCHEMA = CELLS_SCHEMA.append(pa.field("condition", pa.string()))

# baseline summary: one row per condition (and `random_balanced`).
#   interaction, ci_low, ci_high   mean interaction with its prompt-bootstrap CI
#   share, share_ci_low, share_ci_high   interaction / first-divergence interaction (shared resamples)
#   n   events scored in the condition (for random_balanced: prompts with either arm)
BASELINE_SUMMARY_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        ("condition", STR),
        ("n", I64),
        ("interaction", F64),
        *CI,
        *typed(F64, "share", "share_ci_low", "share_ci_high"),
    ]
)


# ---- engine.recipe ------------------------------------------------------------

# lineage: one row per stage, every stage scored as "IT" against the base on the same events and labels.
#   stage                 the descendant's name (e.g. sft, dpo, final)
#   n                     events scored
#   interaction, ci_low, ci_high   mean interaction with its prompt-bootstrap CI
#   p_value               one-sided sign-flip p of the interaction
#   pt_late_effect, it_late_effect, portable_share   the secondary scales (means; share = PT-up / IT-up)
#   share_of_reference, share_ci_low, share_ci_high  interaction / the reference stage's (shared resamples)
#   native_top1_rate      share of events where the stage's own greedy token (native pass) is t_IT
LINEAGE_SCHEMA = pa.schema(
    [
        *_LINEAGE_FIELDS,
        ("stage", STR),
        ("n", I64),
        ("interaction", F64),
        *CI,
        ("p_value", F64),
        *typed(F64, "pt_late_effect", "it_late_effect", "portable_share"),
        *typed(F64, "share_of_reference", "share_ci_low", "share_ci_high"),
        ("native_top1_rate", F64),
    ]
)

# lineage cells: the cells table (engine.results.CELLS_SCHEMA; pair_id = '<base_id>~<stage>') plus
#   stage, native_top1_it (the stage's own masked argmax at the event equals t_IT)
LINEAGE_CELLS_SCHEMA = CELLS_SCHEMA.append(pa.field("stage", pa.string())).append(
    pa.field("native_top1_it", pa.bool_())
)

# recipe_contrasts: one row per (stage_a, stage_b) contrast of a lineage sweep's cells (same support).
#   estimate, ci_low, ci_high   mean per-prompt interaction of stage_a minus stage_b, prompt-bootstrap CI
#   p_value                     one-sided sign-flip (label-swap) p of estimate > 0; n_permutations its budget
RECIPE_CONTRAST_SCHEMA = pa.schema(
    [
        *_LINEAGE_FIELDS,
        *typed(STR, "stage_a", "stage_b"),
        *ESTIMATE_CI,
        ("p_value", pa.float64()),
        ("n", pa.int64()),
        ("n_permutations", pa.int64()),
    ]
)

# ---- engine.anatomy (depth / window anatomy, method 4.8) ------------------------------------

# anatomy_events: one row per event x measure.
#   measure      'full_late_interaction', 'final_k_interaction', 'final_mlp_interaction' or 'mlp_support'
#   k            final-block count of a window (null for mlp_support); band  'early'/'middle'/'late' or null
#   layer_start, layer_stop  the blocks measured, [start, stop)
#   value        the event's interaction (or, for mlp_support, the margin the band's MLPs add in pure IT)
ANATOMY_EVENTS_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        ("measure", pa.string()),
        ("k", pa.int32()),
        ("band", pa.string()),
        ("layer_start", pa.int32()),
        ("layer_stop", pa.int32()),
        ("value", pa.float64()),
    ]
)

# anatomy (summary): one row per statistic of one pair x boundary x readout.
#   statistic    a measure of anatomy_events (mean, prompt-bootstrap CI) or 'final_k_retention'
#                (mean final-k interaction / mean full-late interaction, shared resamples)
#   valid, reason  false with the reason when the window or band cannot be measured at this boundary
ANATOMY_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        ("statistic", pa.string()),
        ("k", pa.int32()),
        ("band", pa.string()),
        ("layer_start", pa.int32()),
        ("layer_stop", pa.int32()),
        ("estimate", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int64()),
        ("valid", pa.bool_()),
        ("reason", pa.string()),
    ]
)

# ---- engine.closure (structured boundary-state closure, method 5.6) --------------------------

# the closure rows of the wrong-descendant arm when no second descendant was given
NO_SECOND_DESCENDANT = (
    "no second descendant given (wrong_descendant: the base paired with another descendant of it)"
)

# closure_cells: one row per boundary x held-out event x arm x rank x alpha.
#   arm          'pca' (the shift's projection on the top-r train PCs), 'gaussian', 'random', 'sign_flip',
#                'wrong_descendant' (the shift projected on a second descendant's top-r train PCs)
#   rank         r (d_model for the full delta); full_delta  true for the unprojected shift
#   alpha        injection scale: U = U_PT + alpha * v at the injected positions
#   y_rescued    Y(U, L_IT); y_floor  Y(U_PT, L_IT); y_native  Y(U_IT, L_IT)
CLOSURE_CELLS_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        ("arm", pa.string()),
        ("rank", pa.int32()),
        ("full_delta", pa.bool_()),
        ("alpha", pa.float64()),
        ("y_rescued", pa.float64()),
        ("y_floor", pa.float64()),
        ("y_native", pa.float64()),
    ]
)

# closure (summary): one row per arm x rank x alpha of one pair x boundary (several boundaries: rows per boundary).
#   positions    'last' (the scored position, the method's) or 'all'
#   n_fit, n_test  events of the train split (PCA) and of the held-out split
#   closure      mean(y_rescued - y_floor) / mean(y_native - y_floor), CI from shared prompt resamples
#   rescued_gap, native_gap   the two means
#   valid, reason  false with the reason (e.g. a train split too small for the rank); closure then null
CLOSURE_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        ("positions", pa.string()),
        ("arm", pa.string()),
        ("rank", pa.int32()),
        ("full_delta", pa.bool_()),
        ("alpha", pa.float64()),
        ("n_fit", pa.int64()),
        ("n_test", pa.int64()),
        ("closure", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("rescued_gap", pa.float64()),
        ("native_gap", pa.float64()),
        ("valid", pa.bool_()),
        ("reason", pa.string()),
    ]
)

# ---- engine.identity_transfer (window grafts at the divergence event, method 4.8) ----------------------

# identity_transfer_events: one row per event x host x window.
#   host         'pt' or 'it': the model whose stack runs; the donor is the other model
#   graft        'blocks' (the donor's whole blocks) or 'mlp' (the donor's MLPs on the host's MLP inputs)
#   window_name  'early', 'middle', 'late' (blocks), 'late' or 'final_<k>' (mlp); layer_start, layer_stop [start, stop)
#   top1         the host's masked greedy token with the window grafted (its own readout)
#   transferred  top1 is the donor's token (t_IT for the PT host, t_PT for the IT host)
#   y_host, y_grafted  Y of the host's own pass and of the grafted pass through `readout`
#   margin_gain  y_grafted - y_host toward the donor's token (negated for the IT host)
IDENTITY_TRANSFER_EVENTS_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        *typed(STR, "host", "graft", "window_name"),
        *typed(I32, "layer_start", "layer_stop"),
        ("top1", I64),
        ("transferred", BOOL),
        *typed(F64, "y_host", "y_grafted", "margin_gain"),
    ]
)

# identity_transfer (summary): one row per host x window x statistic of one pair x boundary x readout.
#   statistic    'transfer_rate' (fraction of events transferred) or 'margin_gain' (mean), prompt-bootstrap CI
#   valid, reason  false with the reason when the window cannot be measured (e.g. final_k with k > L)
IDENTITY_TRANSFER_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        *typed(STR, "host", "graft", "window_name"),
        *typed(I32, "layer_start", "layer_stop"),
        ("statistic", STR),
        *ESTIMATE_CI,
        ("n", I64),
        ("valid", BOOL),
        ("reason", STR),
    ]
)

# ---- engine.source_decomposition (upstream difference by sublayer source, method 4.8) ---------------------

# source_decomposition_events: one row per event x source.
#   source       'embedding', 'attention', 'mlp' (only that source's IT - PT difference added to U_PT at every
#                position) or 'all' (U_IT: the headline 2x2)
#   interaction  [Y(U_s, L_IT) - Y(U_s, L_PT)] - [Y(U_PT, L_IT) - Y(U_PT, L_PT)]
#   diff_norm    norm of the source's difference at the scored position
#   reconstruction_error  max |embedding + attention + mlp - (h_IT - h_PT)| over the event's positions
SOURCE_DECOMPOSITION_EVENTS_SCHEMA = pa.schema(
    [
        *_EVENT_FIELDS,
        ("source", STR),
        *typed(F64, "interaction", "diff_norm", "reconstruction_error"),
    ]
)

# source_decomposition (summary): one row per source x statistic of one pair x boundary x readout.
#   statistic    'interaction' (mean, CI), 'share' (mean source interaction / mean full interaction),
#                'non_additivity' (source 'all': full - sum of the sources' interactions, CI),
#                'reconstruction_error' (source 'all': the largest over events, no CI)
SOURCE_DECOMPOSITION_SCHEMA = pa.schema(
    [
        *_RUN_FIELDS,
        *typed(STR, "source", "statistic"),
        *ESTIMATE_CI,
        ("n", I64),
        ("valid", BOOL),
        ("reason", STR),
    ]
)
