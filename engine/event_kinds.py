"""Other event definitions of the method (section 1.3): first non-format and first assistant-marker difference.

The headline event is the first step where PT's and IT's greedy top-1 tokens differ (`first_diff`). The
method's code also names two other kinds; crosspatch reads them on PT's greedy rollout (the history that
supplies the shared prefix, section 1.2), scanning prefix lengths k = s, s+1, ... from the first
divergence s, and keeps the first k where PT's and IT's top-1 tokens differ AND the pair passes the kind's
test:
    first_nonformat_diff         neither token is format-only (its text is whitespace, punctuation or
                                 symbols, or it is a special token): both sides differ in content
    first_assistant_marker_diff  either token is a chat / assistant marker (text matching MARKER_RE:
                                 "assistant", <|im_start|>, <|start_header_id|>, [INST], <start_of_turn>, ...)
Before s the models agree (so a kind's event is never earlier than the first divergence); past s the
prefix is PT's own continuation, as for the random rollout baselines (engine.baselines). A prompt with no
such disagreement within the budget is kept unscored with reason `no_<kind>_within_budget`. Every event
records its kind in the `event` column of the events table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.pairs import ModelPair

EVENT_KINDS: tuple[str, ...] = ("first_diff", "first_nonformat_diff", "first_assistant_marker_diff")
MARKER_RE = re.compile(
    r"(?i)(assistant|<\|im_(start|end)\|>|<\|(start|end)_header_id\|>|<\|eot_id\|>|\[/?INST\]|"
    r"<start_of_turn>|<end_of_turn>|<\|(user|system|end)\|>)"
)
_FORMAT_RE = re.compile(r"[\W_]*")


def no_event_reason(kind: str) -> str:
    """Reason of a prompt without an event of `kind` within the budget."""
    return f"no_{kind.removeprefix('first_')}_within_budget"


def is_format_only(text: str, special: bool = False) -> bool:
    """True for a token that carries no content: a special token, or text of whitespace/punctuation/symbols."""
    return special or _FORMAT_RE.fullmatch(text.strip()) is not None


def is_marker(text: str) -> bool:
    """True for a chat / assistant marker token (MARKER_RE)."""
    return MARKER_RE.search(text) is not None


def check_kind(kind: str) -> str:
    """`kind` if it is one of EVENT_KINDS, else a ValueError naming them."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event definition {kind!r}; choose from {', '.join(EVENT_KINDS)}")
    return kind


def _test(pair: ModelPair, kind: str) -> Callable[[int, int], bool]:
    """(t_pt, t_it) -> does this disagreement count as an event of `kind`."""
    special = set(pair.tokenizer.all_special_ids) | set(pair.it_tokenizer.all_special_ids)

    def texts(t_pt: int, t_it: int) -> tuple[str, str]:
        return pair.tokenizer.decode([t_pt]), pair.it_tokenizer.decode([t_it])

    if kind == "first_nonformat_diff":

        def nonformat(t_pt: int, t_it: int) -> bool:
            a, b = texts(t_pt, t_it)
            return not is_format_only(a, t_pt in special) and not is_format_only(b, t_it in special)

        return nonformat

    def marker(t_pt: int, t_it: int) -> bool:
        a, b = texts(t_pt, t_it)
        return is_marker(a) or is_marker(b)

    return marker


def refine_events(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    kind: str,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[DivergenceEvent]:
    """First-divergence `events` (one per prompt) -> the events of `kind` (same order, `event` set)."""
    from crosspatch.engine.baselines import _event, _rollout_tops
    from crosspatch.engine.divergence import real_token_mask
    from crosspatch.engine.preflight import TokenPreflight

    check_kind(kind)
    out = [replace(e, event=kind) for e in events]
    if kind == "first_diff":
        return out
    test = _test(pair, kind)
    todo = [i for i, e in enumerate(out) if e.diverged and not test(e.t_pt, e.t_it)]
    if not todo:
        return out
    found: dict[str, DivergenceEvent] = {}
    for e, r, top_pt, top_it in _rollout_tops(pair, [out[i] for i in todo], "pt", max_new_tokens, batch_size):
        for k in range(e.position + 1, len(r) + 1):
            if top_pt[k - 1] != top_it[k - 1] and test(top_pt[k - 1], top_it[k - 1]):
                hit = _event(pair, e, r[:k], top_pt[k - 1], top_it[k - 1])
                hit.t_it_text = pair.it_tokenizer.decode([hit.t_it])
                found[e.prompt_id] = hit
                break
    masks = {
        "pt": real_token_mask(pair.pt, pair.tokenizer),
        "it": real_token_mask(pair.it, pair.it_tokenizer),
    }
    preflight = TokenPreflight(pair, masks)
    for i in todo:
        e = out[i]
        if e.prompt_id in found:
            out[i] = preflight.apply(found[e.prompt_id])
        else:
            out[i] = replace(
                e,
                diverged=False,
                reason=no_event_reason(kind),
                position=None,
                t_pt=None,
                t_it=None,
                t_pt_text="",
                t_it_text="",
                token_check=None,
            )
    return out
