"""First divergence: PT and IT decode greedily in lockstep until their top-1 tokens first differ.

Both models see the same raw prompt ids; at each step each takes the argmax of its own masked logits.
While they agree, the shared token extends the prefix (either model's rollout supplies it). A prompt
stops the moment its two argmaxes differ (an event: `t_pt`, `t_it` at `position` = prefix length) or the
shared token is EOS, or after `max_new_tokens` agreeing steps (reported, never dropped). Decoding is
batched over prompts with a KV cache; finished rows leave the batch at once.

Near ties: at the divergence step each model's top-1 vs runner-up gap is read in fp32 through the same
fp32 readout as every margin (`ArchAdapter.readout` with token ids: final norm in fp32 from the final
residual, the two unembedding columns, softcap), the runner-up being the argmax over the model's masked
vocabulary without its own choice. `gap_pt` / `gap_it` = logit(choice) - logit(runner-up); a gap is
negative when the fp32 readout would pick another token than the model's own (bf16) logits did. The event
is a `near_tie` when either gap is below the threshold: by default the bf16 step at that logit magnitude,
2^(floor(log2 m) - 7) with m = max |logit| of the two tokens (0.125 for logits in [16, 32)), i.e. bf16
rounding alone could swap the two; `near_tie_threshold` sets one absolute threshold instead. The final
residual comes from a pre-hook on the final norm during the decoding forward: no extra forward.

Every event then passes the token preflight (`engine.preflight`): a prompt whose ids differ between the
tokenizers is not decoded, and a divergence whose tokens fail a check is kept unscored as `token_mismatch`.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.adapters import ArchAdapter, positions_from_mask
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
    gap_pt: float | None = None  # fp32 logit(t_pt) - runner-up under PT at the divergence step
    gap_it: float | None = None  # the same under IT
    near_tie: bool | None = None  # a gap below the near-tie threshold (None: not a divergence)
    # not a field (never serialised): the fused path's `EventCapture`, set by `iter_divergences(capture=...)`
    capture = None

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


@contextmanager
def _final_resid_capture(norm: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the final norm's input (the final residual) during a forward; the hook never outlives it."""
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def bf16_step(magnitude: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at `magnitude`: 2^(floor(log2 |m|) - 7) (8 significant bits); 0.125 for |m| in [16, 32)."""
    return torch.exp2(torch.floor(torch.log2(magnitude.abs().clamp_min(2.0**-120))) - 7)


@torch.no_grad()
def top2_gaps(
    adapter: ArchAdapter,
    final_resid: torch.Tensor,
    chosen: torch.Tensor,
    neg_mask: torch.Tensor,
    chunk: int = 32768,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gap logit(chosen) - logit(runner-up) over the masked vocabulary, and the two logits' max |.|.

    `final_resid` `[k, d_model]`, `chosen` `[k]`, `neg_mask` `[vocab]` (0 or -inf). The runner-up is found
    over vocabulary chunks in fp32 (softcap is monotone, so it is left out of the search); both logits are
    then read by `adapter.readout(..., token_ids)`, the path every margin takes. Returns (`[k]`, `[k]`).
    """
    h = adapter.final_norm_fp32(final_resid)  # [k, d_model] fp32
    weight = adapter.unembed.weight  # [vocab, d_model]
    bias = getattr(adapter.unembed, "bias", None)
    k = h.shape[0]
    rows = torch.arange(k, device=h.device)
    best = torch.full((k,), float("-inf"), device=h.device)
    runner = torch.zeros(k, dtype=torch.long, device=h.device)
    for start in range(0, weight.shape[0], chunk):
        logits = h @ weight[start : start + chunk].float().T  # [k, c]
        c = logits.shape[-1]
        if bias is not None:
            logits = logits + bias[start : start + c].float()
        logits = logits + neg_mask[start : start + c]
        local = chosen - start
        inside = (local >= 0) & (local < c)
        logits[rows[inside], local[inside]] = float("-inf")
        value, idx = logits.max(-1)  # [k], [k]
        better = value > best
        best = torch.where(better, value, best)
        runner = torch.where(better, idx + start, runner)
    pair_logits = adapter.readout(final_resid, torch.stack([chosen, runner], dim=-1))  # [k, 2] fp32
    gap = pair_logits[:, 0] - pair_logits[:, 1]  # [k]
    return gap, pair_logits.abs().max(dim=-1).values


class _Decoder(Protocol):
    """What one cached greedy step needs of a model's decoding state (`_Stepper`, `_Slots`)."""

    model: PreTrainedModel
    adapter: ArchAdapter
    neg_mask: torch.Tensor  # [vocab] 0 for allowed tokens, -inf for the rest
    cache_kw: str


@torch.no_grad()
def _greedy_step(
    d: _Decoder,
    ids: torch.Tensor,
    attn: torch.Tensor,
    pos: torch.Tensor,
    cache: DynamicCache,
    **model_kw: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached forward: greedy allowed tokens `[batch]` at the last position and the final residual
    `[batch, seq, d_model]` (the final norm's input)."""
    with _final_resid_capture(d.adapter.final_norm) as fin:
        out = d.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            **model_kw,
            **{d.cache_kw: cache},
        )
    logits = out.logits[:, -1].float()  # [batch, vocab]
    return (logits + d.neg_mask[: logits.shape[-1]]).argmax(-1), fin[-1]  # [batch], [batch, seq, d_model]


class _Stepper:
    """One model's cached greedy decoding over a shrinking batch; keeps the last step's final residual."""

    def __init__(self, model: PreTrainedModel, adapter: ArchAdapter, mask: torch.Tensor) -> None:
        self.model = model
        self.adapter = adapter
        self.neg_mask = torch.where(mask, 0.0, float("-inf")).to(model.device)  # [vocab]
        self.cache = DynamicCache(config=model.config)
        self.cache_kw = _cache_kwarg(model)
        self.final: torch.Tensor | None = None  # [batch, d_model] at the last position of the last step

    @torch.no_grad()
    def next_tokens(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        tokens, final = _greedy_step(self, ids, attention_mask, position_ids, self.cache)
        self.final = final[:, -1]  # [batch, d_model]
        return tokens

    def gaps(self, rows: list[int], chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 top-2 gaps (and logit magnitudes) of batch `rows` whose greedy choices were `chosen`."""
        assert self.final is not None
        idx = torch.tensor(rows, device=self.final.device)
        tokens = torch.tensor(chosen, device=self.final.device)
        return top2_gaps(self.adapter, self.final[idx], tokens, self.neg_mask)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def _flag_near_ties(
    events: list[DivergenceEvent],
    rows: list[int],
    pt: _Stepper | _Slots,
    it: _Stepper | _Slots,
    near_tie_threshold: float | None,
) -> None:
    """Fill gap_pt, gap_it and near_tie of the `events` that diverged at batch `rows` this step."""
    gap_pt, mag_pt = pt.gaps(rows, [e.t_pt for e in events])
    gap_it, mag_it = it.gaps(rows, [e.t_it for e in events])
    if near_tie_threshold is None:
        tie = (gap_pt < bf16_step(mag_pt)) | (gap_it < bf16_step(mag_it))  # [k]
    else:
        tie = (gap_pt < near_tie_threshold) | (gap_it < near_tie_threshold)
    for ev, g_pt, g_it, t in zip(events, gap_pt.tolist(), gap_it.tolist(), tie.tolist(), strict=True):
        ev.gap_pt, ev.gap_it, ev.near_tie = g_pt, g_it, bool(t)


_AGREED = "agreed"


def _advance(ev: DivergenceEvent, t_pt: int, t_it: int, eos: set[int]) -> str:
    """Apply one step's greedy tokens to `ev`: DIVERGED (they differ: the event is set at this position),
    EOS_BEFORE_DIVERGENCE (both chose EOS), or _AGREED (the token joins the shared prefix)."""
    if t_pt != t_it:
        ev.diverged, ev.reason, ev.position = True, DIVERGED, len(ev.prefix_ids)
        ev.t_pt, ev.t_it = t_pt, t_it
        return DIVERGED
    if t_pt in eos:
        ev.reason = EOS_BEFORE_DIVERGENCE
        return EOS_BEFORE_DIVERGENCE
    ev.prefix_ids.append(t_pt)
    return _AGREED


def _decode_batch(
    pair: ModelPair,
    batch: list[PromptRecord],
    max_new_tokens: int,
    chat_template: bool,
    masks: tuple[torch.Tensor, torch.Tensor],
    eos: set[int],
    near_tie_threshold: float | None = None,
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
    pt = _Stepper(pair.pt, pair.pt_adapter, masks[0])
    it = _Stepper(pair.it, pair.it_adapter, masks[1])
    active = list(range(len(events)))  # event index of each live batch row
    for step in range(max_new_tokens):
        a = pt.next_tokens(ids, attn, pos).tolist()  # one sync per step
        c = it.next_tokens(ids, attn, pos).tolist()
        keep_rows: list[int] = []
        div_rows: list[int] = []
        for row, ev_idx in enumerate(active):
            outcome = _advance(events[ev_idx], a[row], c[row], eos)  # position = step
            if outcome == DIVERGED:
                div_rows.append(row)
            elif outcome == _AGREED:
                keep_rows.append(row)
        if div_rows:
            diverged = [events[active[r]] for r in div_rows]
            _flag_near_ties(diverged, div_rows, pt, it, near_tie_threshold)
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


# ---- continuous batching -------------------------------------------------------------------------------


@dataclass
class EventCapture:
    """What the 2x2 needs from the decoding pass of one diverged event (fused path), on the host.

    `inputs[role][b]` `[seq, d_model]`: the residual entering block b at every position of prompt + shared
    prefix (b == n_layers: the final block's output); `final[role]` `[d_model]`: the final residual at the
    divergence step (the diagonal cell).
    """

    boundaries: tuple[int, ...]
    inputs: dict[str, dict[int, torch.Tensor]]
    final: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Host bytes held by this capture."""
        tensors = [t for per in self.inputs.values() for t in per.values()] + list(self.final.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def left_pad_to(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` to `width` columns."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Slots:
    """One model's live decoding state: a KV cache with one row per slot, plus the captured block inputs.

    Every row's real tokens are right-aligned and contiguous (left padding only), so rows of different
    lengths share one cache: a newcomer's prefill cache is left-padded to the batch's width and stacked
    under it, and columns padded in every row are trimmed. The cache holds plain full layers (also for
    sliding-window models): the sliding mask is built on column distances, which equal position distances
    for contiguous rows.
    """

    def __init__(
        self, model: PreTrainedModel, adapter: ArchAdapter, mask: torch.Tensor, capture: Sequence[int]
    ):
        self.model = model
        self.adapter = adapter
        self.neg_mask = torch.where(mask, 0.0, float("-inf")).to(model.device)  # [vocab]
        self.cache_kw = _cache_kwarg(model)
        self.capture = tuple(capture)
        self.cache: DynamicCache | None = None
        self.inputs: dict[
            int, torch.Tensor
        ] = {}  # boundary -> [batch, width, d_model], aligned with the mask
        self.final: torch.Tensor | None = None  # [batch, d_model] at the last position of the last step

    @torch.no_grad()
    def forward(
        self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """One cached step (or prefill): greedy tokens `[batch]`, final residual `[batch, d_model]`, block inputs."""
        seen: dict[int, torch.Tensor] = {}
        handles = []
        n_layers = self.adapter.n_layers
        for b in self.capture:
            if b < n_layers:
                handles.append(
                    self.adapter.blocks[b].register_forward_pre_hook(
                        lambda _m, args, kwargs, b=b: seen.__setitem__(
                            b, (args[0] if args else kwargs["hidden_states"]).detach()
                        ),
                        with_kwargs=True,
                    )
                )
        try:
            # a prefill reads only its last position's logits
            tokens, final = _greedy_step(self, ids, attn, pos, cache, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        if n_layers in self.capture:
            seen[n_layers] = final
        return tokens, final[:, -1], seen

    def step(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Decode one token for every live row (`ids` `[batch, 1]`); returns greedy tokens `[batch]`."""
        assert self.cache is not None
        tokens, self.final, seen = self.forward(ids, attn, pos, self.cache)
        for b, x in seen.items():
            self.inputs[b] = torch.cat([self.inputs[b], x], dim=1)
        return tokens

    def admit(
        self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, width: int, live: int
    ) -> torch.Tensor:
        """Prefill newcomers (`ids` `[new, seq]`) and stack them under the `live` rows at `width` columns."""
        cache = DynamicCache()
        tokens, final, seen = self.forward(ids, attn, pos, cache)
        if not live:
            self.cache, self.final, self.inputs = cache, final, seen
            return tokens
        assert self.cache is not None and self.final is not None
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad_to(old.keys, width, -2), left_pad_to(new.keys, width, -2)])
            old.values = torch.cat([left_pad_to(old.values, width, -2), left_pad_to(new.values, width, -2)])
        for b, x in seen.items():
            self.inputs[b] = torch.cat([left_pad_to(self.inputs[b], width, 1), left_pad_to(x, width, 1)])
        self.final = torch.cat([self.final, final])
        return tokens

    def keep(self, rows: torch.Tensor, lead: int) -> None:
        """Keep batch `rows` and drop the first `lead` columns (padding in every kept row)."""
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, lead:]
            layer.values = layer.values[rows, :, lead:]
        self.inputs = {b: x[rows, lead:] for b, x in self.inputs.items()}

    def gaps(self, rows: list[int], chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 top-2 gaps (and logit magnitudes) of batch `rows` whose greedy choices were `chosen`."""
        assert self.final is not None
        idx = torch.tensor(rows, device=self.final.device)
        tokens = torch.tensor(chosen, device=self.final.device)
        return top2_gaps(self.adapter, self.final[idx], tokens, self.neg_mask)

    def spill(self, row: int, length: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Row `row`'s last `length` positions of every captured input, and its final residual, on the host."""
        assert self.final is not None
        return {b: x[row, -length:].to("cpu") for b, x in self.inputs.items()}, self.final[row].to("cpu")


def _decode_continuous(
    pair: ModelPair,
    events: list[DivergenceEvent],
    max_new_tokens: int,
    masks: tuple[torch.Tensor, torch.Tensor],
    eos: set[int],
    batch_size: int,
    near_tie_threshold: float | None = None,
    capture: Sequence[int] = (),
    refill_at: int = 1,
) -> Iterator[int]:
    """Decode `events` (prompt ids set) with continuous batching; yield each event's index as it finishes.

    At most `batch_size` rows decode together; as soon as `refill_at` slots are free (or the batch is
    empty) the next queued prompts are prefilled and join the batch, so decode steps run full batches
    until the queue is empty. Each row follows exactly the lockstep rule (same tokens, same events).
    With `capture` (boundaries), a diverged event gets `capture` set (`EventCapture`) as it finishes.
    """
    device = pair.pt.device
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    pt = _Slots(pair.pt, pair.pt_adapter, masks[0], capture)
    it = _Slots(pair.it, pair.it_adapter, masks[1], capture)
    queue = list(range(len(events)))[::-1]  # pop() takes the next prompt in input order
    active: list[int] = []  # event index of each live row
    attn = torch.zeros((0, 0), dtype=torch.long, device=device)  # [batch, width]
    pos = torch.zeros((0, 1), dtype=torch.long, device=device)  # [batch, 1] position of each row's last token
    while active or queue:
        a: list[int] = []
        c: list[int] = []
        if active:
            ids = torch.tensor([[events[i].prefix_ids[-1]] for i in active], device=device)  # [batch, 1]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos + 1
            a, c = pt.step(ids, attn, pos).tolist(), it.step(ids, attn, pos).tolist()  # one sync per step
        free = batch_size - len(active)
        if queue and (not active or free >= min(refill_at, len(queue))):
            new = [queue.pop() for _ in range(min(free, len(queue)))]
            new_ids, new_attn = left_pad([events[i].prompt_ids for i in new], pad, device)
            new_pos = positions_from_mask(new_attn)
            width = max(attn.shape[1], new_attn.shape[1])
            live = len(active)
            a += pt.admit(new_ids, new_attn, new_pos, width, live).tolist()
            c += it.admit(new_ids, new_attn, new_pos, width, live).tolist()
            attn = torch.cat([left_pad_to(attn, width, 1), left_pad_to(new_attn, width, 1)])
            pos = torch.cat([pos, new_pos[:, -1:]])
            active = active + new
        keep_rows: list[int] = []
        div_rows: list[int] = []
        done_rows: list[int] = []
        for row, ev_idx in enumerate(active):
            ev = events[ev_idx]
            outcome = _advance(ev, a[row], c[row], eos)
            if outcome == DIVERGED:
                div_rows.append(row)
            elif outcome == _AGREED and len(ev.prefix_ids) < max_new_tokens:
                keep_rows.append(row)
                continue
            done_rows.append(row)
        if div_rows:
            _flag_near_ties([events[active[r]] for r in div_rows], div_rows, pt, it, near_tie_threshold)
            if capture:
                for r in div_rows:
                    ev = events[active[r]]
                    n = len(ev.input_ids)
                    (pt_in, pt_fin), (it_in, it_fin) = pt.spill(r, n), it.spill(r, n)
                    ev.capture = EventCapture(
                        tuple(capture), {"pt": pt_in, "it": it_in}, {"pt": pt_fin, "it": it_fin}
                    )
        finished = [active[r] for r in done_rows]
        if len(keep_rows) < len(active):
            if keep_rows:
                rows = torch.tensor(keep_rows, device=device)
                attn, pos = attn[rows], pos[rows]
                lead = int((attn.sum(0) == 0).long().cumprod(0).sum())  # columns padded in every kept row
                attn = attn[:, lead:]
                pt.keep(rows, lead)
                it.keep(rows, lead)
            else:
                attn, pos = attn[:0, :0], pos[:0]
                pt.cache = it.cache = None
            active = [active[r] for r in keep_rows]
        yield from finished


class Tokenizers(Protocol):
    """What naming an event needs from a pair: both tokenizers (a `ModelPair` or an `engine.staged.StagedPair`)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def it_tokenizer(self) -> PreTrainedTokenizerBase: ...


def describe_event(pair: Tokenizers, ev: DivergenceEvent) -> DivergenceEvent:
    """Texts of the prefix (PT's tokenizer) and of each target under its own model's tokenizer."""
    ev.prefix_text = pair.tokenizer.decode(ev.prefix_ids)
    if ev.t_pt is not None and ev.t_it is not None:
        ev.t_pt_text, ev.t_it_text = pair.tokenizer.decode([ev.t_pt]), pair.it_tokenizer.decode([ev.t_it])
    return ev


def mismatch_event(pair: Tokenizers, record: PromptRecord) -> DivergenceEvent:
    """An unscored event for a prompt the two tokenizers encode differently (never decoded)."""
    return DivergenceEvent(
        prompt_id=record.id,
        category=record.category,
        prompt_ids=pair.tokenizer.encode(record.text, add_special_tokens=True),
        reason=TOKEN_MISMATCH,
        prompt_text=record.text,
        token_check=CHECK_PROMPT_IDS,
    )


def check_decoding(max_new_tokens: int, batch_size: int, near_tie_threshold: float | None) -> None:
    """ValueError unless the budget and batch size are >= 1 and the near-tie threshold is None or finite >= 0."""
    if near_tie_threshold is not None and not (math.isfinite(near_tie_threshold) and near_tie_threshold >= 0):
        raise ValueError(
            f"near_tie_threshold must be a finite number >= 0 or None, got {near_tie_threshold!r}"
        )
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")


def iter_divergences(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    event: str = "first_diff",
    near_tie_threshold: float | None = None,
    continuous: bool = True,
    capture: Sequence[int] | None = None,
    max_capture_bytes: int = 2 << 30,
) -> Iterator[list[DivergenceEvent]]:
    """Yield one list of events per batch of prompts (in input order), for streaming and checkpoints.

    `event`: first_diff (the headline), first_nonformat_diff or first_assistant_marker_diff (see
    engine.event_kinds). `near_tie_threshold`: an absolute fp32 gap below which an event is a near tie;
    None (default) uses the bf16 step at the two logits' magnitude (see the module docstring).
    `continuous` (default): continuous batching (a finished row's slot takes the next prompt at once);
    False: the lockstep batches of `batch_size` prompts (same events). `capture` (boundaries, continuous
    first_diff only): keep on each diverged event what the fused 2x2 needs (`DivergenceEvent.capture`), up to
    `max_capture_bytes` of host memory in all; events past that budget are scored by the unfused 2x2.
    """
    from crosspatch.engine.event_kinds import check_kind, refine_events

    check_kind(event)
    check_decoding(max_new_tokens, batch_size, near_tie_threshold)
    if capture and not (continuous and event == "first_diff"):
        raise ValueError("capture (the fused 2x2) needs continuous batching and the first_diff event")
    masks = (real_token_mask(pair.pt, pair.tokenizer), real_token_mask(pair.it, pair.it_tokenizer))
    preflight = TokenPreflight(pair, {"pt": masks[0], "it": masks[1]})
    eos = set(eos_ids(pair.pt, pair.tokenizer)) | set(eos_ids(pair.it, pair.it_tokenizer))
    run = _Run(pair, preflight, max_new_tokens, batch_size, chat_template, masks, eos, near_tie_threshold)
    if continuous:
        chunks = _continuous_chunks(run, prompts, tuple(capture or ()), max_capture_bytes)
    else:
        chunks = _lockstep_chunks(run, prompts)
    done = 0
    for events in chunks:
        if event != "first_diff":
            events = refine_events(pair, events, event, max_new_tokens, batch_size)
        done += len(events)
        if on_batch:
            on_batch(done, len(prompts))
        yield events


@dataclass(frozen=True)
class _Run:
    """What both decoding schedules (lockstep, continuous) share for one `iter_divergences` call."""

    pair: ModelPair
    preflight: TokenPreflight
    max_new_tokens: int
    batch_size: int
    chat_template: bool
    masks: tuple[torch.Tensor, torch.Tensor]  # real-token masks over each vocabulary: ([V_pt], [V_it])
    eos: set[int]
    near_tie_threshold: float | None


def _lockstep_chunks(run: _Run, prompts: Sequence[PromptRecord]) -> Iterator[list[DivergenceEvent]]:
    """Lockstep: each batch of prompts decodes together until its last row finishes."""
    pair, preflight, batch_size = run.pair, run.preflight, run.batch_size
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        same = [preflight.prompt_ids_match(r.text) for r in batch]
        ok = [r for r, s in zip(batch, same, strict=True) if s]
        decoded = iter(
            _decode_batch(
                pair, ok, run.max_new_tokens, run.chat_template, run.masks, run.eos, run.near_tie_threshold
            )
            if ok
            else []
        )
        yield [
            describe_event(pair, preflight.apply(next(decoded))) if s else mismatch_event(pair, r)
            for r, s in zip(batch, same, strict=True)
        ]


def _continuous_chunks(
    run: _Run, prompts: Sequence[PromptRecord], capture: tuple[int, ...], max_capture_bytes: int
) -> Iterator[list[DivergenceEvent]]:
    """Continuous batching over all prompts; chunks of `batch_size` prompts are yielded as they complete."""
    pair, preflight, batch_size = run.pair, run.preflight, run.batch_size
    events: list[DivergenceEvent] = []
    finished: list[bool] = []
    todo: list[int] = []  # indices of prompts to decode
    for r in prompts:
        if preflight.prompt_ids_match(r.text):
            todo.append(len(events))
            ev = DivergenceEvent(
                r.id, r.category, encode_prompt(pair, r.text, run.chat_template), prompt_text=r.text
            )
            events.append(ev)
            finished.append(False)
        else:
            events.append(mismatch_event(pair, r))
            finished.append(True)
    held = 0
    start = 0
    decoder = _decode_continuous(
        pair,
        [events[i] for i in todo],
        run.max_new_tokens,
        run.masks,
        run.eos,
        batch_size,
        run.near_tie_threshold,
        capture,
    )
    for k in decoder:
        i = todo[k]
        ev = describe_event(pair, preflight.apply(events[i]))
        if ev.capture is not None:
            if not ev.diverged or held + ev.capture.nbytes > max_capture_bytes:
                ev.capture = None  # unscored, or over the budget: the unfused 2x2 (if any) recomputes it
            else:
                held += ev.capture.nbytes
        finished[i] = True
        while start < len(events) and all(finished[start : start + batch_size]):
            yield events[start : start + batch_size]
            start += batch_size
    while start < len(events):  # only prompt mismatches remain
        yield events[start : start + batch_size]
        start += batch_size


def find_divergences(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = False,
    event: str = "first_diff",
    near_tie_threshold: float | None = None,
    continuous: bool = True,
) -> list[DivergenceEvent]:
    """One `DivergenceEvent` per prompt, in input order (non-divergent prompts carry their reason)."""
    return [
        e
        for batch in iter_divergences(
            pair,
            prompts,
            max_new_tokens,
            batch_size,
            chat_template,
            event=event,
            near_tie_threshold=near_tie_threshold,
            continuous=continuous,
        )
        for e in batch
    ]
