"""First divergence: PT and IT decode greedily in lockstep until their top-1 tokens first differ.

Both models see the same raw prompt ids; at each step each takes the argmax of its own masked logits.
While they agree, the shared token extends the prefix (either model's rollout supplies it). A prompt
stops the moment its two argmaxes differ (an event: `t_pt`, `t_it` at `position` = prefix length) or the
shared token is EOS, or after `max_new_tokens` agreeing steps (reported, never dropped). Decoding is
batched over prompts with a KV cache; finished rows leave the batch at once.

Every event then passes the token preflight (`engine.preflight`): a prompt whose ids differ between the
tokenizers is not decoded, and a divergence whose tokens fail a check is kept unscored as `token_mismatch`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.preflight import CHECK_PROMPT_IDS, TOKEN_MISMATCH, TokenPreflight
from crosspatch.engine.prompts import PromptRecord

DIVERGED = "diverged"
EOS_BEFORE_DIVERGENCE = "eos_before_divergence"
NO_DIVERGENCE_IN_BUDGET = "no_divergence_within_budget"

_UNUSED = re.compile(r"^(<unused\d+>|<\|reserved_special_token_\d+\|>|\[unused\d+\])$")


@dataclass
class DivergenceEvent:
    """One prompt's outcome. `diverged` (scored) events carry the tokens; others carry the `reason`.

    A `token_mismatch` event keeps its position and tokens and names the failed check in `token_check`.
    """

    prompt_id: str
    category: str
    prompt_ids: list[int]
    prefix_ids: list[int] = field(default_factory=list)
    diverged: bool = False
    reason: str = NO_DIVERGENCE_IN_BUDGET
    position: int | None = None
    t_pt: int | None = None
    t_it: int | None = None
    prompt_text: str = ""
    prefix_text: str = ""
    t_pt_text: str = ""
    t_it_text: str = ""
    token_check: str | None = None
    event: str = "first_diff"  # the event definition (engine.event_kinds.EVENT_KINDS)

    @property
    def input_ids(self) -> list[int]:
        """Raw prompt + shared prefix: the sequence whose last position is scored."""
        return self.prompt_ids + self.prefix_ids

    def to_dict(self) -> dict:
        return asdict(self)


def real_token_mask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """`[vocab]` bool: True for tokens greedy decoding may pick.

    False for unembedding rows past the tokenizer (vocab padding), `<unusedN>` / reserved specials, and
    pad/BOS/UNK. EOS stays allowed, so EOS can be a divergent token (as in the method).
    """
    n_rows = model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(n_rows, dtype=torch.bool)
    mask[: min(len(tokenizer), n_rows)] = True
    for token, idx in tokenizer.get_vocab().items():
        if idx < n_rows and _UNUSED.match(token):
            mask[idx] = False
    eos = set(eos_ids(model, tokenizer))
    for idx in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id):
        if idx is not None and idx < n_rows and idx not in eos:
            mask[idx] = False
    return mask


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a generation for this model (generation config and tokenizer)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


def encode_prompt(pair: ModelPair, text: str, chat_template: bool = False) -> list[int]:
    """Raw prompt ids (BOS added as the tokenizer does), or IT's chat template for IT-only studies."""
    if chat_template:
        if not getattr(pair.it_tokenizer, "chat_template", None):
            raise CrosspatchError("the IT tokenizer has no chat template; drop --chat-template (raw prompts)")
        ids = pair.it_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding
    return pair.tokenizer.encode(text, add_special_tokens=True)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to `[batch, seq]` ids and attention mask, so the last column is every row's last token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Stepper:
    """One model's cached greedy decoding over a shrinking batch."""

    def __init__(self, model: PreTrainedModel, mask: torch.Tensor) -> None:
        self.model = model
        self.neg_mask = torch.where(mask, 0.0, float("-inf")).to(model.device)  # [vocab]
        self.cache = DynamicCache(config=model.config)
        self.cache_kw = _cache_kwarg(model)

    @torch.no_grad()
    def next_tokens(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        logits = out.logits[:, -1].float()  # [batch, vocab]
        return (logits + self.neg_mask[: logits.shape[-1]]).argmax(-1)  # [batch]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def _decode_batch(
    pair: ModelPair,
    batch: list[PromptRecord],
    max_new_tokens: int,
    chat_template: bool,
    masks: tuple[torch.Tensor, torch.Tensor],
    eos: set[int],
) -> list[DivergenceEvent]:
    device = pair.pt.device
    events = [
        DivergenceEvent(
            prompt_id=r.id,
            category=r.category,
            prompt_ids=encode_prompt(pair, r.text, chat_template),
            prompt_text=r.text,
        )
        for r in batch
    ]
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    ids, attn = left_pad([e.prompt_ids for e in events], pad, device)
    pos = positions_from_mask(attn)
    pt, it = _Stepper(pair.pt, masks[0]), _Stepper(pair.it, masks[1])
    active = list(range(len(events)))  # event index of each live batch row
    for step in range(max_new_tokens):
        a = pt.next_tokens(ids, attn, pos).tolist()  # one sync per step
        c = it.next_tokens(ids, attn, pos).tolist()
        keep_rows: list[int] = []
        for row, ev_idx in enumerate(active):
            ev = events[ev_idx]
            if a[row] != c[row]:
                ev.diverged, ev.reason, ev.position = True, DIVERGED, step
                ev.t_pt, ev.t_it = a[row], c[row]
            elif a[row] in eos:
                ev.reason = EOS_BEFORE_DIVERGENCE
            else:
                ev.prefix_ids.append(a[row])
                keep_rows.append(row)
        if not keep_rows or step == max_new_tokens - 1:
            break
        if len(keep_rows) < len(active):
            rows = torch.tensor(keep_rows, device=device)
            pt.keep(rows)
            it.keep(rows)
            attn, pos = attn[rows], pos[rows]
            active = [active[r] for r in keep_rows]
        ids = torch.tensor([[events[i].prefix_ids[-1]] for i in active], device=device)  # [batch, 1]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    return events


def _describe(pair: ModelPair, ev: DivergenceEvent) -> DivergenceEvent:
    """Texts of the prefix (PT's tokenizer) and of each target under its own model's tokenizer."""
    ev.prefix_text = pair.tokenizer.decode(ev.prefix_ids)
    if ev.t_pt is not None and ev.t_it is not None:
        ev.t_pt_text, ev.t_it_text = pair.tokenizer.decode([ev.t_pt]), pair.it_tokenizer.decode([ev.t_it])
    return ev


def _prompt_mismatch(pair: ModelPair, record: PromptRecord) -> DivergenceEvent:
    """An unscored event for a prompt the two tokenizers encode differently (never decoded)."""
    return DivergenceEvent(
        prompt_id=record.id,
        category=record.category,
        prompt_ids=pair.tokenizer.encode(record.text, add_special_tokens=True),
        reason=TOKEN_MISMATCH,
        prompt_text=record.text,
        token_check=CHECK_PROMPT_IDS,
    )


def iter_divergences(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    event: str = "first_diff",
) -> Iterator[list[DivergenceEvent]]:
    """Yield one list of events per batch of prompts (in input order), for streaming and checkpoints.

    `event`: first_diff (the headline), first_nonformat_diff or first_assistant_marker_diff (see
    engine.event_kinds)."""
    from crosspatch.engine.event_kinds import check_kind, refine_events

    check_kind(event)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    masks = (real_token_mask(pair.pt, pair.tokenizer), real_token_mask(pair.it, pair.it_tokenizer))
    preflight = TokenPreflight(pair, {"pt": masks[0], "it": masks[1]})
    eos = set(eos_ids(pair.pt, pair.tokenizer)) | set(eos_ids(pair.it, pair.it_tokenizer))
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        same = [preflight.prompt_ids_match(r.text) for r in batch]
        ok = [r for r, s in zip(batch, same, strict=True) if s]
        decoded = iter(_decode_batch(pair, ok, max_new_tokens, chat_template, masks, eos) if ok else [])
        events = [
            _describe(pair, preflight.apply(next(decoded))) if s else _prompt_mismatch(pair, r)
            for r, s in zip(batch, same, strict=True)
        ]
        if event != "first_diff":
            events = refine_events(pair, events, event, max_new_tokens, batch_size)
        if on_batch:
            on_batch(start + len(batch), len(prompts))
        yield events


def find_divergences(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = False,
    event: str = "first_diff",
) -> list[DivergenceEvent]:
    """One `DivergenceEvent` per prompt, in input order (non-divergent prompts carry their reason)."""
    return [
        e
        for batch in iter_divergences(pair, prompts, max_new_tokens, batch_size, chat_template, event=event)
        for e in batch
    ]
