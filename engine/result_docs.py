"""What every result table and column means, in one place, for people and for other tools.

The schemas live in `engine.results` (and the control modules); this module says what each table and
column means. `describe(schema, table)` attaches the descriptions as Arrow field metadata
(`b"description"`), which Parquet files keep; the service turns the same text into DuckDB
`COMMENT ON` statements, and `docs/results.md` is generated from it (`python -m
crosspatch.app.store.result_tables > docs/results.md`; a test keeps the file in step).
"""

from __future__ import annotations

import pyarrow as pa

_EVENT_KEY = {
    "family": "model family of the pair (llama, qwen3, gemma3, ...)",
    "pair_id": "unique pair id: folder names + a hash of the resolved paths and revisions (or the allow-list key)",
    "prompt_id": "the prompt's id in its JSONL file (unique within a pair)",
    "category": "the prompt's category from its JSONL record",
}

# table -> (what one row is, {column: meaning})
TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "cells": (
        "One row per scored event x boundary x readout: the 2x2 cells Y = logit(t_IT) - logit(t_PT) at the "
        "scored position and their effects (docs/method.md §2).",
        {
            **_EVENT_KEY,
            "position": "generated position of the first divergence (0 = first token after the prompt)",
            "t_pt": "PT's greedy token at the divergence (token id)",
            "t_it": "IT's greedy token at the divergence (token id)",
            "boundary": "index of the first late block; the upstream state is the residual entering it",
            "readout": "'it' (common-IT final norm + unembedding, the headline), 'pt' (common-PT) or 'own'",
            "pair_label": "the pair's human label (not unique; pair_id is the key)",
            "n_layers": "the pair's depth L, so depth = boundary / n_layers",
            "headline_boundary": "the pair's headline boundary: round(0.6 L) unless the job named one",
            "y_ptup_ptlate": "Y with PT upstream and PT late stack (PT's clean pass)",
            "y_ptup_itlate": "Y with PT upstream and IT late stack (IT host, PT residual patched in)",
            "y_itup_ptlate": "Y with IT upstream and PT late stack (PT host, IT residual patched in)",
            "y_itup_itlate": "Y with IT upstream and IT late stack (IT's clean pass)",
            "pt_late_effect": "y_ptup_itlate - y_ptup_ptlate: the IT late stack's effect from PT upstream",
            "it_late_effect": "y_itup_itlate - y_itup_ptlate: the IT late stack's effect from IT upstream",
            "interaction": "it_late_effect - pt_late_effect: how much the late effect depends on upstream",
            "near_tie": "the event's near-tie flag (events.near_tie); null when unknown",
        },
    ),
    "events": (
        "One row per prompt, diverged or not: where PT and IT first disagree under greedy decoding, with "
        "the texts (docs/method.md §1).",
        {
            **_EVENT_KEY,
            "diverged": "true when the event is scored (a first divergence that passed the token preflight)",
            "reason": "'diverged', or why not: no divergence in the budget, both EOS, token_mismatch, ...",
            "token_check": "the token-preflight check that failed (prompt_ids, decode, vocab, mask); else null",
            "position": "generated position of the first divergence (0 = first token after the prompt)",
            "t_pt": "PT's greedy token at the divergence (token id)",
            "t_it": "IT's greedy token at the divergence (token id)",
            "n_prompt_tokens": "tokens in the prompt (BOS included where the tokenizer adds one)",
            "prompt_ids": "the prompt's token ids (equal under both tokenizers)",
            "prefix_ids": "the shared greedy prefix generated before the divergence",
            "prompt_text": "the raw prompt text",
            "prefix_text": "the shared prefix decoded",
            "event": "event definition: first_diff (the headline), first_nonformat_diff or "
            "first_assistant_marker_diff (engine/event_kinds.py)",
            "t_pt_text": "PT's divergent token decoded with PT's tokenizer",
            "t_it_text": "IT's divergent token decoded with IT's tokenizer",
            "gap_pt": "PT's fp32 logit of its choice minus its runner-up at the divergence step (< 0: the fp32 "
            "readout would pick another token than the model's own argmax)",
            "gap_it": "the same for IT",
            "near_tie": "a gap below the near-tie threshold (default: the bf16 step at the logits' magnitude)",
        },
    ),
    "summaries": (
        "One row per level x pair-or-family x boundary-or-depth x readout x subset x statistic: estimates "
        "with 95% CIs and p-values from engine.stats.summarize (docs/method.md §3).",
        {
            "level": "'pair' (mean over prompts, percentile bootstrap CI), 'family' (unweighted mean of "
            "its pairs, normal CI) or 'balanced' (unweighted mean over families, normal CI)",
            "family": "model family; null on balanced rows",
            "pair_id": "the pair; null on family and balanced rows",
            "pair_label": "the pair's human label; null where several pairs are combined",
            "boundary": "first late block; null where the combined pairs' boundaries differ",
            "n_layers": "depth L; null where the combined pairs' depths differ",
            "depth": "boundary / n_layers; null where they differ",
            "headline": "true at each pair's headline boundary; false on swept or depth-matched rows",
            "readout": "'it', 'pt' or 'own' (see cells.readout)",
            "subset": "'all', 'position>=k', 'category=c', ...: which events",
            "statistic": "a cell (y_*), an effect (pt_late_effect, it_late_effect, interaction), or a share: "
            "portable_share (PT-up / IT-up late effect) or interaction_share (interaction / diagonal shift), "
            "ratios of means",
            "estimate": "the mean (pair), mean of pair means (family) or of family means (balanced)",
            "ci_low": "lower end of the 95% CI",
            "ci_high": "upper end of the 95% CI",
            "n": "prompts (summed over pairs on family and balanced rows)",
            "n_pairs": "pairs combined in the row",
            "p_value": "one-sided sign-flip (label-swap) p of interaction > 0; floor 1/(n_permutations+1); "
            "balanced rows: the pooled across-family null (one flip per prompt id; exact when enumerable)",
            "p_adjusted": "Holm-adjusted p over the pair's boundaries (= p_value for one boundary)",
            "p_sweep": "sweep-wide p: the max statistic over boundaries under the same sign flips",
            "n_permutations": "sign flips drawn; p-values are >= 1/(n_permutations + 1) (exact pooled p: the "
            "2^P patterns enumerated)",
        },
    ),
    "feature_acts": (
        "One row per event x dictionary x active latent: the latent's activation at the scored position in "
        "the two IT-late cells, and its attribution on the fit split (docs/method.md §5).",
        {
            "family": _EVENT_KEY["family"],
            "pair_id": _EVENT_KEY["pair_id"],
            "prompt_id": _EVENT_KEY["prompt_id"],
            "dictionary_id": "the dictionary (registry id or path)",
            "layer": "the layer whose MLP output the dictionary reads",
            "latent": "latent index in the dictionary",
            "act_ptup": "activation in (PT upstream, IT late)",
            "act_itup": "activation in (IT upstream, IT late)",
            "attribution": "gradient x activation attr(II) - attr(PI) for this event (fit split; null on test)",
            "split": "'fit' (ranking) or 'test' (held-out mediation)",
        },
    ),
    "feature_examples": (
        "One row per latent x top-activating event (its top events by IT-up activation, stored at mediation "
        "time for feature pages): the scored token decoded with its context (engine/feature_pages.py).",
        {
            "family": _EVENT_KEY["family"],
            "pair_id": _EVENT_KEY["pair_id"],
            "dictionary_id": "the dictionary (registry id or path)",
            "layer": "the layer whose MLP output the dictionary reads",
            "latent": "latent index in the dictionary",
            "rank": "0 = the event where the latent fired most in (IT upstream, IT late)",
            "prompt_id": _EVENT_KEY["prompt_id"],
            "split": "'fit' (ranking) or 'test' (held-out mediation)",
            "activation": "activation in (IT upstream, IT late) at the scored position (= feature_acts.act_itup)",
            "activation_ptup": "activation in (PT upstream, IT late) (= feature_acts.act_ptup)",
            "context_before": "decoded prompt + shared prefix before the scored token (its last 240 characters)",
            "token": "the decoded scored token: the last input token, whose MLP output mediation reads",
            "context_after": "the decoded token after it: IT's divergent token t_IT",
        },
    ),
    "feature_decoder_tokens": (
        "One row per latent x direction x rank: the tokens a latent's decoder row promotes (top) or "
        "suppresses (bottom) read through IT's unembedding without the final norm (W_dec[f] @ W_U.T, over "
        "real tokens), with the crosscoder PT decoder share (engine/feature_pages.py).",
        {
            "family": _EVENT_KEY["family"],
            "pair_id": _EVENT_KEY["pair_id"],
            "dictionary_id": "the dictionary (registry id or path)",
            "layer": "the layer whose MLP output the dictionary reads",
            "latent": "latent index in the dictionary",
            "architecture": "the dictionary's kind: sae, transcoder or crosscoder",
            "branch": "the decoder branch read ('it' for crosscoders, the one branch otherwise)",
            "direction": "'top' (largest logits, promoted) or 'bottom' (smallest, suppressed)",
            "rank": "0 = the most extreme token in this direction",
            "token_id": "token id in the pair's tokenizer",
            "token": "the decoded token",
            "value": "W_dec[latent, branch] . W_U(IT)[token]: the direct logit per unit activation, no final norm",
            "pt_decoder_share": "crosscoders: |W_dec[f, pt]| / (|W_dec[f, pt]| + |W_dec[f, it]|), 0 = IT-only; "
            "null for single-branch dictionaries",
        },
    ),
    "feature_effects": (
        "One row per dictionary x latent-or-set x intervention x k x statistic: ablation / rescue effects "
        "on held-out events with 95% CIs, and per-feature attribution scores (docs/method.md §5).",
        {
            "family": _EVENT_KEY["family"],
            "pair_id": _EVENT_KEY["pair_id"],
            "dictionary_id": "one dictionary id, or comma-joined ids for a multi-layer feature set",
            "layer": "the latent's layer on per-feature rows; null on set-level rows",
            "intervention": "ablate_topk, ablate_matched_random, ablate_same_delta_random, rescue_*, "
            "ablate_single (one feature, held out), attribution (per-feature score), baseline",
            "k": "the set's real size; on attribution and ablate_single rows the feature's rank",
            "latent": "latent index on per-feature rows; null on set-level rows",
            "statistic": "interaction_drop, share, it_late_drop, rescue_gain, rescue_fraction, "
            "attribution_score, interaction, missing_margin",
            "effect": "the estimate; null for a share whose denominator CI covers 0 or an unavailable control",
            "ci_low": "lower end of the 95% bootstrap CI",
            "ci_high": "upper end of the 95% bootstrap CI",
            "n": "held-out events; 0 for an unavailable control",
        },
    ),
    "gate_checks": (
        "One row per dictionary x quality-gate check a job measured (docs/method.md §4): the dictionary's "
        "own checks and mediation's causal checks.",
        {
            "family": _EVENT_KEY["family"],
            "pair_id": _EVENT_KEY["pair_id"],
            "dictionary_id": "the dictionary (registry id or path)",
            "check_name": "heldout_tokens, fve_<branch>, l0_target, alive_fraction, topk_causal_drop, "
            "matched_random_drop",
            "value": "the measured value; null when it could not be measured (the detail says why)",
            "threshold": "the numeric threshold where one applies (the detail states the rule)",
            "passed": "true when the check passed (or does not apply to this architecture)",
            "detail": "status, rule and how it was measured",
        },
    ),
}

_CELL_NAMES = {
    "ptup_ptlate": "PT up, PT late",
    "ptup_itlate": "PT up, IT late",
    "itup_ptlate": "IT up, PT late",
    "itup_itlate": "IT up, IT late",
}
TABLE_DOCS.update(
    {
        "continuation": (
            "One row per event x variant x tail length N: the sequence margin C_N of the IT candidate "
            "(t_IT + tail) over the PT candidate (t_PT + tail), teacher-forced through the four cells "
            "(docs/method.md §7).",
            {
                **_EVENT_KEY,
                "position": "generated position of the first divergence",
                "boundary": "first late block of the 2x2",
                "readout": "'it', 'pt' or 'own' (see cells.readout)",
                "variant": "native (each model's own greedy tail), same_forced or shuffled_tail (controls)",
                "n": "tail length N (N = 0 is the one-token 2x2)",
                **{
                    f"c_{k}": f"C_N = log p(IT candidate) - log p(PT candidate) in ({v})"
                    for k, v in _CELL_NAMES.items()
                },
                **{
                    f"tail_{k}": f"tail-only C_N (the first token left out) in ({v})"
                    for k, v in _CELL_NAMES.items()
                },
                "interaction": "the 2x2 interaction of C_N",
                "tail_interaction": "the 2x2 interaction of tail-only C_N (0 at N = 0)",
                "it_candidate": "t_IT followed by the tail's first N tokens",
                "pt_candidate": "t_PT followed by the tail's first N tokens",
                "it_candidate_text": "the IT candidate decoded",
                "pt_candidate_text": "the PT candidate decoded",
            },
        ),
        "continuation_summaries": (
            "One row per pair x variant x N x statistic: the mean over events with a percentile bootstrap CI.",
            {
                "pair_id": _EVENT_KEY["pair_id"],
                "variant": "native, same_forced or shuffled_tail",
                "n": "tail length N",
                "statistic": "interaction or tail_interaction",
                "mean": "mean over events",
                "ci_low": "lower end of the 95% bootstrap CI",
                "ci_high": "upper end of the 95% bootstrap CI",
                "n_events": "events with a tail of at least N tokens",
            },
        ),
        "forced_tokens": (
            "One row per event x forced branch: the IT model continues greedily after a forced first token; "
            "the continuation is scored by a deterministic validator (docs/method.md §7).",
            {
                **_EVENT_KEY,
                "position": "generated position of the first divergence",
                "branch": "it (IT-preferred token), pt (PT-preferred), rank_matched or class_matched",
                "forced_token": "the forced first token (id)",
                "forced_text": "the forced token decoded",
                "it_rank": "rank of the forced token in IT's masked ranking at the event (1 = top)",
                "validator": "exact_answer, format or refusal; null when the category is not objectively scored",
                "success": "the validator's verdict on the suffix only (the forced token excluded); null if unscored",
                "success_with_token": "the verdict on forced token + suffix",
                "n_new_tokens": "tokens generated after the forced token",
                "stop": "eos or budget",
                "continuation_ids": "the generated suffix (token ids)",
                "continuation_text": "the suffix decoded with IT's tokenizer",
            },
        ),
        "forced_summaries": (
            "One row per level x pair x category x statistic x view: success rates and the IT-minus-PT contrast "
            "with bootstrap CIs.",
            {
                "level": "pair or balanced (family-balanced)",
                "pair_id": "the pair; null on balanced rows",
                "category": "prompt category",
                "statistic": "contrast (IT-forced minus PT-forced success) or success_<branch>",
                "view": "suffix (primary) or with_token",
                "mean": "the estimate",
                "ci_low": "lower end of the 95% bootstrap CI",
                "ci_high": "upper end of the 95% bootstrap CI",
                "n_events": "events scored in both branches",
                "n_families": "families combined",
            },
        ),
        "lora_controls": (
            "One row per trained LoRA domain-training control (docs/method.md §7): its verification and, when "
            "valid, the base-vs-control interaction. A control that fails verification has no interaction.",
            {
                "family": _EVENT_KEY["family"],
                "pair_id": "the base vs control pair",
                "status": "valid or not_valid",
                "failed_checks": "comma-separated failed checks: domain_nll, merge_equivalence, generation_health",
                "nll_before": "held-out domain NLL of the base (nats/token)",
                "nll_after": "held-out domain NLL of the merged control",
                "nll_improvement": "(before - after) / before",
                "min_nll_improvement": "the verification threshold on nll_improvement",
                "merge_max_diff": "max |merged - (base + adapter)| over logits",
                "distinct_share": "share of distinct tokens in the control's generations",
                "max_token_share": "share of the most frequent token in the control's generations",
                "steps": "training steps",
                "interaction": "the 2x2 interaction base vs control; null when not valid",
                "ci_low": "lower end of its 95% CI",
                "ci_high": "upper end of its 95% CI",
                "n_events": "events scored",
            },
        ),
    }
)

_KEYS = {
    "family": _EVENT_KEY["family"],
    "pair_id": _EVENT_KEY["pair_id"],
    "boundary": "index of the first late block the control ran at (the pair's headline boundary)",
    "readout": "readout of Y: 'it' (common-IT, the headline), 'pt' or 'own'",
}
_PER_EVENT = {
    **_KEYS,
    "prompt_id": _EVENT_KEY["prompt_id"],
    "category": _EVENT_KEY["category"],
    "position": "generated position of the scored event",
}
_CI = {
    "ci_low": "lower end of the 95% percentile prompt-bootstrap CI",
    "ci_high": "upper end of the 95% CI",
}

# the controls of the 2x2 (docs/method.md §4.3-4.7; schemas in engine/control_schemas.py)
CONTROL_TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "interpolation": (
        "One row per event x alpha: the upstream state U(a) = (1 - a) U_PT + a U_IT run through both late "
        "stacks (off-manifold check, §4.4).",
        {
            **_PER_EVENT,
            "alpha": "interpolation weight a of U_IT",
            "y_itlate": "Y(U(a), IT late stack)",
            "y_ptlate": "Y(U(a), PT late stack)",
            "late_effect": "L(a) = y_itlate - y_ptlate",
            "contrast": "C(a) = L(a) - L(0): 0 at a = 0, the event's interaction at a = 1",
        },
    ),
    "signperm": (
        "One row per event x seed: U_PT + a signed permutation of (U_IT - U_PT) through both late stacks (§4.4).",
        {
            **_PER_EVENT,
            "seed": "the draw of the signed coordinate permutation",
            "y_itlate": "Y(U_rand, IT late stack)",
            "y_ptlate": "Y(U_rand, PT late stack)",
            "random_interaction": "(y_itlate - y_ptlate) - the PT-upstream late effect",
            "observed_interaction": "the event's 2x2 interaction (same for every seed)",
        },
    ),
    "offmanifold": (
        "One row per pair x statistic of the off-manifold checks (§4.4).",
        {
            **_KEYS,
            "statistic": "'slope' (mean per-event slope of C(a)), 'curve' (mean C(a) at alpha), 'interaction', "
            "'random_interaction', 'signperm_ratio' (random / observed, ratio of means)",
            "alpha": "the grid point of a 'curve' row; null otherwise",
            "estimate": "the statistic's value",
            **_CI,
            "n": "events",
        },
    ),
    "boundary_margins": (
        "One row per event: IT's logit-lens margin at the boundary (pre-late commitment, §4.5).",
        {
            **{k: v for k, v in _PER_EVENT.items() if k != "readout"},
            "boundary_margin": "IT final norm + unembedding on IT's boundary residual: t_IT minus t_PT logit",
            "favours_it": "boundary_margin > 0: IT's boundary readout already prefers t_IT",
        },
    ),
    "commitment": (
        "One row per pair x view of the interaction by boundary margin (§4.5).",
        {
            **_KEYS,
            "view": "'all', 'uncommitted' (margin <= 0), 'committed', 'bin' (a margin bin) or 'intercept' "
            "(interaction at margin 0 from a linear fit)",
            "margin_low": "lower end of the view's margin range (null where unbounded)",
            "margin_high": "upper end of the view's margin range (null where unbounded)",
            "estimate": "mean interaction of the view (or the intercept)",
            **_CI,
            "n": "events in the view",
        },
    ),
    "baseline_cells": (
        "One row per scored event x condition: the 2x2 on first divergences, random rollout disagreements, "
        "pre-divergence prefixes and native-history disagreements (§4.3, §4.6).",
        {
            **{c: d for c, d in TABLE_DOCS["cells"][1].items()},
            "position": "scored prefix length in generated tokens (native history: the horizon)",
            "condition": "first_divergence, random_pt_rollout, random_it_rollout, pre_divergence, "
            "native_pt_history or native_it_history",
        },
    ),
    "baselines": (
        "One row per pair x condition: the interaction and its share of the first-divergence interaction (§4.3).",
        {
            **_KEYS,
            "condition": "a condition of baseline_cells, or random_balanced (mean of the two rollout arms)",
            "n": "events scored (random_balanced: prompts with either arm)",
            "interaction": "mean interaction (native history: events averaged within prompt first)",
            **_CI,
            "share": "interaction / first-divergence interaction (ratio of means; null for native history)",
            "share_ci_low": "lower end of the share's 95% CI (shared prompt resamples)",
            "share_ci_high": "upper end of the share's 95% CI",
        },
    ),
    "lineage_cells": (
        "One row per stage x event: each descendant scored as IT against the base on one fixed support (§4.7).",
        {
            **{c: d for c, d in TABLE_DOCS["cells"][1].items()},
            "pair_id": "'<support pair id>~<stage>'",
            "stage": "the descendant's name (e.g. sft, dpo, final)",
            "native_top1_it": "the stage's own greedy token at the event is the support's t_IT",
        },
    ),
    "lineage": (
        "One row per stage of a lineage sweep (§4.7): cumulative comparisons, not causal stage attribution.",
        {
            "family": _EVENT_KEY["family"],
            "base_id": "the support pair's id (base -> final)",
            "boundary": _KEYS["boundary"],
            "readout": _KEYS["readout"],
            "stage": "the descendant's name",
            "n": "events scored",
            "interaction": "mean interaction",
            **_CI,
            "p_value": "one-sided sign-flip p of the interaction",
            "pt_late_effect": "mean PT-upstream late effect",
            "it_late_effect": "mean IT-upstream late effect",
            "portable_share": "pt_late_effect / it_late_effect",
            "share_of_reference": "interaction / the reference stage's (ratio of means)",
            "share_ci_low": "lower end of the share's 95% CI (shared prompt resamples)",
            "share_ci_high": "upper end of the share's 95% CI",
            "native_top1_rate": "share of events where the stage's own greedy token is t_IT",
        },
    ),
    "recipe_contrasts": (
        "One row per (stage_a, stage_b): interaction of A minus B per prompt on the same support (§4.1).",
        {
            "family": _EVENT_KEY["family"],
            "base_id": "the support pair's id",
            "boundary": _KEYS["boundary"],
            "readout": _KEYS["readout"],
            "stage_a": "the first descendant",
            "stage_b": "the second descendant",
            "estimate": "mean per-prompt interaction difference A - B",
            **_CI,
            "p_value": "one-sided sign-flip (label-swap) p of estimate > 0",
            "n": "prompts on the shared support",
            "n_permutations": "sign flips drawn (p >= 1 / (n_permutations + 1))",
        },
    ),
}
# depth / window anatomy (§4.8) and boundary-state closure (§5.6): engine.anatomy, engine.closure
_VALID = {
    "valid": "false when the row cannot be measured here (see reason); its values are then null or NaN",
    "reason": "why the row is not valid (null when valid)",
}
CONTROL_TABLE_DOCS |= {
    "anatomy_events": (
        "One row per event x measure of the depth / window anatomy (§4.8).",
        {
            **_PER_EVENT,
            "measure": "'full_late_interaction', 'final_k_interaction' (2x2 with only the final k blocks "
            "swapped), 'final_mlp_interaction' (2x2 interaction of the margin the final k MLPs add) or "
            "'mlp_support' (margin the band's MLPs add in the pure IT pass)",
            "k": "final-block count of the window (null for mlp_support)",
            "band": "'early', 'middle' or 'late' depth band of mlp_support (null otherwise)",
            "layer_start": "first block measured",
            "layer_stop": "one past the last block measured",
            "value": "the event's value of the measure (logits)",
        },
    ),
    "anatomy": (
        "One row per pair x statistic of the depth / window anatomy (§4.8).",
        {
            **_KEYS,
            "statistic": "a measure of anatomy_events (mean over events) or 'final_k_retention' (mean "
            "final-k interaction / mean full-late interaction, ratio of means)",
            "k": "final-block count of the window (null for mlp_support)",
            "band": "depth band of mlp_support (null otherwise)",
            "layer_start": "first block measured",
            "layer_stop": "one past the last block measured",
            "estimate": "the statistic's value",
            **_CI,
            "n": "events",
            **_VALID,
        },
    ),
    "identity_transfer_events": (
        "One row per event x host x window of the identity transfer (§4.8): the other model's window grafted "
        "into the host at the divergence event.",
        {
            **_PER_EVENT,
            "host": "'pt' or 'it': the model whose stack runs (the donor is the other model)",
            "graft": "'blocks' (the donor's whole blocks) or 'mlp' (the donor's MLPs on the host's MLP inputs)",
            "window_name": "'early', 'middle', 'late' (blocks; the method's windows scaled to L) or 'late', "
            "'final_<k>' (mlp)",
            "layer_start": "first grafted block",
            "layer_stop": "one past the last grafted block",
            "top1": "the host's greedy (masked argmax) token with the window grafted, its own readout",
            "transferred": "top1 is the donor's token (t_IT for the PT host, t_PT for the IT host)",
            "y_host": "Y of the host's own pass (through readout)",
            "y_grafted": "Y of the grafted pass",
            "margin_gain": "y_grafted - y_host toward the donor's token (negated for the IT host)",
        },
    ),
    "identity_transfer": (
        "One row per pair x host x window x statistic of the identity transfer (§4.8).",
        {
            **_KEYS,
            "host": "'pt' or 'it' (the donor is the other model)",
            "graft": "'blocks' or 'mlp'",
            "window_name": "as in identity_transfer_events",
            "layer_start": "first grafted block",
            "layer_stop": "one past the last grafted block",
            "statistic": "'transfer_rate' (fraction of events whose host top-1 becomes the donor's token) or "
            "'margin_gain' (mean)",
            "estimate": "the statistic's value",
            **_CI,
            "n": "events",
            **_VALID,
        },
    ),
    "source_decomposition_events": (
        "One row per event x source: the 2x2 interaction with only that source's IT - PT boundary "
        "difference added to PT's upstream state (§4.8, our reading).",
        {
            **_PER_EVENT,
            "source": "'embedding', 'attention' or 'mlp' (that sublayer type's summed writes up to the "
            "boundary, IT minus PT, every position) or 'all' (U_IT: the headline 2x2)",
            "interaction": "[Y(U_s, IT late) - Y(U_s, PT late)] - [Y(U_PT, IT late) - Y(U_PT, PT late)]",
            "diff_norm": "norm of the source's difference at the scored position",
            "reconstruction_error": "max |embedding + attention + mlp - (h_IT - h_PT)| over the event's positions",
        },
    ),
    "source_decomposition": (
        "One row per pair x source x statistic of the source decomposition (§4.8).",
        {
            **_KEYS,
            "source": "'embedding', 'attention', 'mlp' or 'all'",
            "statistic": "'interaction' (mean), 'share' (mean source interaction / mean full interaction), "
            "'non_additivity' (full minus the sum of the sources) or 'reconstruction_error' (largest over events)",
            "estimate": "the statistic's value",
            **_CI,
            "n": "events",
            **_VALID,
        },
    ),
    "closure_cells": (
        "One row per boundary x held-out event x arm x rank x alpha of the boundary-state closure (§5.6).",
        {
            **_PER_EVENT,
            "arm": "'pca' (projection of the event's IT - PT boundary shift on the top-r train PCs), "
            "'gaussian', 'random' (norm-matched, orthogonal to the top PCs), 'sign_flip' (minus the projection) "
            "or 'wrong_descendant' (the shift projected on a second descendant's top-r train PCs)",
            "rank": "r, the number of PCA directions (d_model for the full delta)",
            "full_delta": "true for the unprojected shift (rank 'full')",
            "alpha": "injection scale: upstream = U_PT + alpha x the injected vector",
            "y_rescued": "Y(injected upstream, IT late stack)",
            "y_floor": "Y(U_PT, IT late stack), the weak hybrid",
            "y_native": "Y(U_IT, IT late stack), the native descendant-upstream cell",
        },
    ),
    "closure": (
        "One row per pair x boundary x arm x rank x alpha of the boundary-state closure (§5.6); the "
        "wrong-descendant arm is not valid when no second descendant was given.",
        {
            **_KEYS,
            "positions": "'last' (injected at the scored position, the method's) or 'all' positions",
            "arm": "as in closure_cells (controls at alpha 1)",
            "rank": "r (d_model for the full delta)",
            "full_delta": "true for the unprojected shift",
            "alpha": "injection scale",
            "n_fit": "train events the PCA directions were fitted on",
            "n_test": "held-out events scored",
            "closure": "mean(y_rescued - y_floor) / mean(y_native - y_floor) (ratio of means)",
            "ci_low": "lower end of the closure's 95% CI (shared prompt resamples)",
            "ci_high": "upper end of the closure's 95% CI",
            "rescued_gap": "mean(y_rescued - y_floor)",
            "native_gap": "mean(y_native - y_floor)",
            **_VALID,
        },
    ),
}
TABLE_DOCS.update(CONTROL_TABLE_DOCS)

# the handoff chain (docs/method.md §5.4, §5.5; engine/handoff.py)
TABLE_DOCS.update(
    {
        "handoff": (
            "One row per level x analysis x window-or-alpha x feature set x statistic: the upstream-dependent "
            "gate, the rescue dose-response and MLP-window handoff grafts for mediation's selected top set, "
            "with its controls (engine/handoff.py; held-out events; 95% percentile bootstrap CIs on pair "
            "rows, normal-approximation CIs on family and balanced rows).",
            {
                "family": _EVENT_KEY["family"] + "; null on balanced rows",
                "pair_id": _EVENT_KEY["pair_id"] + "; null on family / balanced rows",
                "dictionary_id": "comma-joined ids of the run's dictionaries; null on family / balanced rows",
                "level": "'pair', 'family' (unweighted mean of its pairs) or 'balanced' (of families)",
                "analysis": "gate (drop(IT up) - drop(PT up) on the support), dose (rescue at alpha), "
                "rescue_graft (from (PT up, IT late), donor IT MLPs), degrade_graft (from (IT up, IT late), "
                "donor PT MLPs)",
                "window_name": "graft window: early, mid, late_preterminal, midlate_preterminal or terminal_entry "
                "(the whole residual entering the terminal boundary swapped); null for gate / dose",
                "window_start": "first grafted MLP block (inclusive); null for terminal_entry",
                "window_stop": "grafted blocks end here (exclusive); terminal_entry: the terminal boundary",
                "boundary": "gate / dose: the late boundary b; grafts: the terminal boundary (first "
                "dictionary layer); null on family / balanced rows",
                "alpha": "dose only: the fraction of the way from the PT-up to the IT-up activations",
                "set_kind": "topk (mediation's largest selected set), matched_random, same_delta_random, "
                "top_active_noncausal (most active latents with no positive fit score), none (baselines)",
                "k": "the selected set's size (controls have the same size); null on family / balanced rows",
                "statistic": "gate: gate, drop_itup, drop_ptup, gate_excess (top set - control), interaction "
                "(on the support), support_fraction; dose: rescue_gain, rescue_fraction (ratio of means; null "
                "when the missing margin's CI covers 0), gain_excess, missing_margin, alpha0_max_abs_diff "
                "(must be 0); grafts: total (margin change), mediated (the part removed by ablating the set "
                "in both passes), mediated_fraction (per prompt, |total| > min_denominator only), "
                "mediated_excess",
                "effect": "the estimate; null for an unavailable control or no finite denominator",
                "ci_low": "lower end of the 95% CI",
                "ci_high": "upper end of the 95% CI",
                "n": "events behind the estimate (the support for gate rows, finite denominators for "
                "mediated_fraction); 0 when unavailable",
            },
        ),
        "feature_upstream": (
            "One row per pair x dictionary x latent x split: the latent's mean activation in the IT late "
            "stack under IT vs PT upstream state, and their paired difference (is it driven by upstream?).",
            {
                "family": _EVENT_KEY["family"],
                "pair_id": _EVENT_KEY["pair_id"],
                "dictionary_id": "the dictionary (registry id or path)",
                "layer": "the layer whose MLP output the dictionary reads",
                "latent": "latent index in the dictionary (latents that fired at least once)",
                "split": "'test' (held out from ranking) or 'fit'",
                "mean_act_itup": "mean activation in (IT upstream, IT late), inactive events counted as 0",
                "mean_act_ptup": "mean activation in (PT upstream, IT late), inactive events counted as 0",
                "diff": "mean paired difference act_itup - act_ptup",
                "ci_low": "lower end of the normal-approximation 95% CI of diff",
                "ci_high": "upper end of that CI",
                "n": "events of the split",
            },
        ),
    }
)

DESCRIPTION = b"description"


def column_doc(table: str, column: str) -> str:
    """The meaning of `table.column`; KeyError names what is undocumented."""
    try:
        return TABLE_DOCS[table][1][column]
    except KeyError:
        raise KeyError(f"column {table}.{column} has no description in engine/result_docs.py") from None


def describe(schema: pa.Schema, table: str) -> pa.Schema:
    """`schema` with each field's description as field metadata (kept by Parquet)."""
    fields = [
        f.with_metadata({**(f.metadata or {}), DESCRIPTION: column_doc(table, f.name).encode()})
        for f in schema
    ]
    return pa.schema(fields, metadata={**(schema.metadata or {}), DESCRIPTION: TABLE_DOCS[table][0].encode()})


def markdown(tables: list[tuple[str, str, list[tuple[str, str, str]]]]) -> str:
    """docs/results.md from (table, what a row is, [(column, type, meaning)]) entries."""
    lines = [
        "# Result tables",
        "",
        "Generated from `engine/result_docs.py` and `app/store/result_tables.py`",
        "(`python -m crosspatch.app.store.result_tables > docs/results.md`; a test keeps this file in step).",
        "The same text is in the results DuckDB file (`COMMENT ON`, so `duckdb_columns()` and `duckdb_tables()`",
        "explain themselves) and in every Parquet file the service serves (Arrow field metadata `description`).",
        "The file is written with DuckDB's storage compatibility v1.1.0: any DuckDB from 1.1 on opens it.",
        "",
    ]
    for table, what, columns in tables:
        lines += [f"## `{table}`", "", what, "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{name}` | {kind} | {doc} |" for name, kind, doc in columns]
        lines.append("")
    return "\n".join(lines)
