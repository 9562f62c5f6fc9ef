"""Staged pair execution: one model resident at a time, for pairs whose two models do not fit together.

Lockstep decoding and the 2x2 keep PT and IT resident side by side (engine.divergence, engine.crosspatch).
When the memory estimate (engine.admission) says both do not fit the devices, a job runs in phases instead,
each model loaded once per phase and unloaded (really freed) before the other loads:

  divergence  PT decodes every prompt greedily alone (to its EOS or the budget), keeping its tokens and, at
              every step, its fp32 top-1 minus runner-up gap; then IT decodes the same prompts, each row
              stopping where IT's token differs from PT's at that step or is EOS. While the two agree each
              model's own rollout is the shared prefix, so the events are lockstep decoding's: same position,
              tokens, reason, prefix and gaps (IT's gap read at its divergence step, PT's from its stored step).
  2x2         IT: clean pass, storing the residual entering every boundary block and the final residual at the
              scored position -> PT: clean pass, and PT's late stack on IT's stored boundary inputs -> IT:
              IT's late stack on PT's stored boundary inputs. Margins are read through each readout
              (common-IT, common-PT, own); a `pt` readout keeps PT's head (final norm + unembedding) for the
              last phase. Loads for divergence + 2x2: PT, IT, PT, IT.

Stored states (boundary inputs `[batch, seq, d_model]` per boundary, final residuals `[batch, d_model]`) live
in host memory up to `StateStore.max_bytes`, then in memory-mapped files under a temporary directory.
The runtime no-op checks (engine.noop) run per model in its own phase on the first batch.
Event kinds other than `first_diff` need both models at once and are refused.
"""

from __future__ import annotations

import gc
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from transformers import AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.adapters import (
    SUPPORTED_MODEL_TYPES,
    ArchAdapter,
    adapter_for,
    module_device,
    positions_from_mask,
)
from crosspatch.engine.admission import read_shape
from crosspatch.engine.crosspatch import CELLS, _cells_table, length_batches, margin
from crosspatch.engine.divergence import (
    DIVERGED,
    EOS_BEFORE_DIVERGENCE,
    NO_DIVERGENCE_IN_BUDGET,
    DivergenceEvent,
    bf16_step,
    check_decoding,
    describe_event,
    encode_prompt,
    eos_ids,
    left_pad,
    mismatch_event,
    real_token_mask,
    top2_gaps,
)
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.noop import NoopReport, attach, make_report, role_noop_diffs
from crosspatch.engine.pairs import (
    ModelPair,
    load_model,
    resolve_identity,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from crosspatch.engine.preflight import TokenPreflight
from crosspatch.engine.prompts import PromptRecord
from crosspatch.engine.results import CELLS_SCHEMA

Loader = Callable[[], PreTrainedModel]
ROLES = ("pt", "it")


class StagedPair:
    """A PT/IT pair whose models load on demand, at most one resident: `use(role)` loads it (freeing the other).

    Holds what needs no weights (tokenizers, family, ids, depth and width from config.json); `pt` / `it`
    raise while that model is absent. Quacks like `ModelPair` where only those are read.
    """

    resolve_boundaries = ModelPair.resolve_boundaries
    headline_boundary = ModelPair.headline_boundary
    default_boundary = ModelPair.default_boundary

    def __init__(
        self,
        loaders: dict[str, Loader],
        tokenizer: PreTrainedTokenizerBase,
        it_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        n_layers: int,
        d_model: int,
        family: str,
        pair_id: str,
        pair_label: str | None = None,
    ) -> None:
        if set(loaders) != set(ROLES):
            raise ValueError(f"loaders must name exactly {ROLES}, got {sorted(loaders)}")
        self.loaders = loaders
        self.tokenizer = tokenizer
        self.it_tokenizer = it_tokenizer or tokenizer
        self.n_layers, self.d_model = n_layers, d_model
        self.family, self.pair_id = family, pair_id
        self.pair_label = pair_label or pair_id
        self.loads: list[str] = []  # every load, in order (the phases a job ran)
        self._models: dict[str, PreTrainedModel] = {}
        self._adapters: dict[str, ArchAdapter] = {}
        self._fingerprints: dict[str, str] = {}  # role -> weights hash, taken at its first load
        self._names: dict[str, str] = {}

    @classmethod
    def from_models(
        cls, pt: PreTrainedModel, it: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
    ) -> StagedPair:
        """Stage two models already in memory (tests, notebooks): same results, nothing freed."""
        a = adapter_for(pt)
        kwargs.setdefault("family", a.family)
        kwargs.setdefault("pair_id", f"{a.family}-pair")
        return cls(
            {"pt": lambda: pt, "it": lambda: it}, tokenizer, n_layers=a.n_layers, d_model=a.d_model, **kwargs
        )

    def provenance(self) -> dict[str, str]:
        """`ModelPair.provenance`'s hashes; a model never loaded yet reads `not loaded`."""
        return {
            "pt_weights": self._fingerprints.get("pt", "not loaded"),
            "it_weights": self._fingerprints.get("it", "not loaded"),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "pt_name": self._names.get("pt", ""),
            "it_name": self._names.get("it", ""),
        }

    # ---- residency ---------------------------------------------------------------------------
    def resident(self) -> list[str]:
        """Roles whose model is loaded now."""
        return list(self._models)

    def use(self, role: str) -> ArchAdapter:
        """Make `role` the one resident model (unloading the other first) and return its adapter."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        for other in [r for r in self._models if r != role]:
            self.release(other)
        if role not in self._models:
            model = self.loaders[role]()
            adapter = adapter_for(model)
            if (adapter.n_layers, adapter.d_model) != (self.n_layers, self.d_model):
                raise CrosspatchError(
                    f"{role.upper()} has {adapter.n_layers} layers x d_model {adapter.d_model}, the pair "
                    f"{self.n_layers} x {self.d_model}; cross-patching needs equal shapes"
                )
            self._models[role], self._adapters[role] = model, adapter
            self.loads.append(role)
            if role not in self._fingerprints:
                self._fingerprints[role] = weights_fingerprint(model)
                self._names[role] = str(getattr(model.config, "_name_or_path", ""))
        return self._adapters[role]

    def release(self, role: str | None = None) -> None:
        """Unload `role` (None: both): drop every reference, collect, and return cached device memory."""
        for r in [role] if role else list(self._models):
            self._models.pop(r, None)
            self._adapters.pop(r, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def model(self, role: str) -> PreTrainedModel:
        """The resident model of `role`; a clear error when it is not loaded."""
        if role not in self._models:
            raise CrosspatchError(f"{role.upper()} is not resident (staged pair: call use({role!r}) first)")
        return self._models[role]

    @property
    def pt(self) -> PreTrainedModel:
        return self.model("pt")

    @property
    def it(self) -> PreTrainedModel:
        return self.model("it")

    def adapter(self, role: str) -> ArchAdapter:
        self.model(role)
        return self._adapters[role]


IDENTITY = ("family", "pair_id", "pair_label", "pt_revision", "it_revision")


def load_staged_pair(
    pt: str | Path,
    it: str | Path,
    *,
    device: str | dict[str, int | str] = "cpu",
    dtype: str | torch.dtype = "float32",
    max_memory: dict[int | str, int | str] | None = None,
    **identity: str | None,
) -> StagedPair:
    """A `StagedPair` of two saved models: tokenizers and shapes now, weights only when a phase needs them.

    `identity`: `load_pair`'s `family`, `pair_id`, `pair_label`, `pt_revision`, `it_revision`.
    """
    unknown = sorted(set(identity) - set(IDENTITY))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown}; valid: device, dtype, max_memory, {', '.join(IDENTITY)}"
        )
    family, pair_id, pair_label, pt_revision, it_revision = (identity.get(k) for k in IDENTITY)
    shape = read_shape(pt)

    def loader(path: str | Path, revision: str | None) -> Loader:
        return lambda: load_model(
            path,
            device=device,
            dtype=dtype,
            revision=revision,
            require_tokenizer=False,
            max_memory=max_memory,
        )[0]

    model_type = json.loads((Path(pt).expanduser() / "config.json").read_text()).get("model_type", "")
    pair_id, pair_label = resolve_identity(pt, it, pt_revision, it_revision, pair_id, pair_label)
    return StagedPair(
        {"pt": loader(pt, pt_revision), "it": loader(it, it_revision)},
        AutoTokenizer.from_pretrained(str(pt), revision=pt_revision),
        AutoTokenizer.from_pretrained(str(it), revision=it_revision),
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        family=family or SUPPORTED_MODEL_TYPES.get(model_type, model_type),
        pair_id=pair_id,
        pair_label=pair_label,
    )


class StateStore:
    """Tensors kept between phases: host memory up to `max_bytes`, then memory-mapped files (`spill_dir`)."""

    def __init__(self, max_bytes: int = 2 << 30, spill_dir: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.in_memory = 0  # bytes held in host memory
        self.spilled = 0  # bytes written to files
        self._mem: dict[Any, torch.Tensor] = {}
        self._files: dict[Any, Path] = {}
        self._dir = Path(spill_dir) if spill_dir else None
        self._own_dir = spill_dir is None

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self.in_memory + n <= self.max_bytes:
            self._mem[key] = t
            self.in_memory += n
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="crosspatch-staged-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{len(self._files):06d}.pt"
        torch.save(t, path)
        self._files[key] = path
        self.spilled += n

    def get(self, key: Any, device: torch.device | str = "cpu") -> torch.Tensor:
        if key in self._mem:
            return self._mem[key].to(device)
        return torch.load(self._files[key], mmap=True, weights_only=True).to(device)

    def close(self) -> None:
        """Drop every tensor and delete the spill files."""
        self._mem.clear()
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Head:
    """A model's readout (final norm + unembedding + softcap) kept after its blocks left: ArchAdapter's code."""

    readout = ArchAdapter.readout
    final_norm_fp32 = ArchAdapter.final_norm_fp32

    def __init__(self, adapter: ArchAdapter) -> None:
        self.final_norm, self.unembed, self.softcap = adapter.final_norm, adapter.unembed, adapter.softcap

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device


def _input_device(adapter: ArchAdapter) -> torch.device:
    """Where token ids go in: the embedding's device (the first block's on an offloaded embedding)."""
    embed = adapter.decoder.wte if adapter.is_gpt2 else adapter.decoder.embed_tokens
    return module_device(embed)


# ---- divergence ------------------------------------------------------------------------------
class _Solo:
    """One model's cached greedy decoding over a shrinking batch (the lockstep stepper, one model)."""

    def __init__(self, model: PreTrainedModel, adapter: ArchAdapter, mask: torch.Tensor) -> None:
        self.model, self.adapter = model, adapter
        self.neg_mask = torch.where(mask, 0.0, float("-inf")).to(adapter.device)  # [vocab]
        self.cache = DynamicCache(config=model.config)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.final: torch.Tensor | None = None  # [batch, d_model]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.adapter.final_norm.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
        finally:
            handle.remove()
        self.final = seen[-1][:, -1]  # [batch, d_model]
        logits = out.logits[:, -1].float()  # [batch, vocab]
        return (logits + self.neg_mask[: logits.shape[-1]].to(logits.device)).argmax(-1)  # [batch]

    def gaps(self, rows: list[int], chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.final is not None
        dev = self.adapter.device
        final = self.final.to(dev)[torch.tensor(rows, device=dev)]  # [k, d_model]
        return top2_gaps(self.adapter, final, torch.tensor(chosen, device=dev), self.neg_mask)


def _decode_solo(
    model: PreTrainedModel,
    adapter: ArchAdapter,
    mask: torch.Tensor,
    prompts: list[list[int]],
    pad: int,
    budget: int,
    stop: set[int],
    follow: list[list[int]] | None = None,
) -> tuple[list[list[int]], dict[tuple[int, int], tuple[float, float]]]:
    """Greedy tokens per prompt and fp32 (gap, magnitude) per (prompt, step) where read.

    Alone (`follow` None): a row stops after a token in `stop` or at `budget`; the gap is read at every step.
    Following another model's tokens: a row stops where its token differs from `follow` (the gap is read
    there) or is in `stop`.
    """
    device = _input_device(adapter)
    ids, attn = left_pad(prompts, pad, device)
    pos = positions_from_mask(attn)
    solo = _Solo(model, adapter, mask)
    tokens: list[list[int]] = [[] for _ in prompts]
    gaps: dict[tuple[int, int], tuple[float, float]] = {}
    active = list(range(len(prompts)))
    for step in range(budget):
        chosen = solo.step(ids, attn, pos).tolist()  # one sync per step
        keep: list[int] = []
        read: list[int] = []
        for row, i in enumerate(active):
            tokens[i].append(chosen[row])
            differs = follow is not None and chosen[row] != follow[i][step]
            if follow is None or differs:
                read.append(row)
            if not differs and chosen[row] not in stop:
                keep.append(row)
        if read:
            gap, mag = solo.gaps(read, [chosen[r] for r in read])
            for r, g, m in zip(read, gap.tolist(), mag.tolist(), strict=True):
                gaps[(active[r], step)] = (g, m)
        if not keep or step == budget - 1:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            solo.cache.batch_select_indices(rows.to(solo.model.device))
            attn, pos = attn[rows], pos[rows]
            active = [active[r] for r in keep]
        ids = torch.tensor([[tokens[i][-1]] for i in active], device=device)  # [batch, 1]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    return tokens, gaps


def staged_divergences(
    pair: StagedPair,
    prompts: Sequence[PromptRecord],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = False,
    event: str = "first_diff",
    near_tie_threshold: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[DivergenceEvent]:
    """`find_divergences` with one model resident at a time: PT decodes alone, then IT follows PT's tokens.

    Same events as lockstep decoding (see the module docstring); leaves IT resident (the 2x2's first phase).
    """
    if event != "first_diff":
        raise ValueError(
            f"event {event!r} reads both models' rollouts together; staged execution supports only first_diff"
        )
    check_decoding(max_new_tokens, batch_size, near_tie_threshold)
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    ids_check = TokenPreflight(pair, {})  # type: ignore[arg-type]  # tokenizers only: no model needed
    same = [ids_check.prompt_ids_match(r.text) for r in prompts]
    starts = range(0, len(prompts), batch_size)  # lockstep's batches, so each row sees the same batch
    batches = [[i for i in range(s, min(s + batch_size, len(prompts))) if same[i]] for s in starts]
    ids = {i: encode_prompt(pair, prompts[i].text, chat_template) for b in batches for i in b}  # type: ignore[arg-type]
    total, done = 2 * len(prompts), 0
    masks: dict[str, torch.Tensor] = {}
    stops: dict[str, set[int]] = {}
    tokens: dict[str, dict[int, list[int]]] = {"pt": {}, "it": {}}
    gaps: dict[str, dict[tuple[int, int], tuple[float, float]]] = {"pt": {}, "it": {}}
    for role in ROLES:
        adapter = pair.use(role)
        model = pair.model(role)
        tok = pair.tokenizer if role == "pt" else pair.it_tokenizer
        masks[role] = real_token_mask(model, tok)
        stops[role] = set(eos_ids(model, tok))
        for start, batch in zip(starts, batches, strict=True):
            if batch:
                rows = [ids[i] for i in batch]
                if role == "pt":  # alone, to its own EOS or the budget
                    toks, got = _decode_solo(
                        model, adapter, masks[role], rows, pad, max_new_tokens, stops["pt"]
                    )
                else:  # following PT's tokens: stops at the first difference or a shared EOS
                    follow = [tokens["pt"][i] for i in batch]
                    stop = stops["pt"] | stops["it"]
                    toks, got = _decode_solo(
                        model, adapter, masks[role], rows, pad, max_new_tokens, stop, follow
                    )
                tokens[role].update(zip(batch, toks, strict=True))
                gaps[role].update({(batch[r], step): v for (r, step), v in got.items()})
            done += min(batch_size, len(prompts) - start)
            if on_batch:
                on_batch(done, total)
    preflight = TokenPreflight(pair, masks)  # type: ignore[arg-type]
    eos = stops["pt"] | stops["it"]
    events = []
    for i, record in enumerate(prompts):
        if not same[i]:
            events.append(mismatch_event(pair, record))
            continue
        ev = _compare(
            record,
            ids[i],
            tokens["pt"][i],
            tokens["it"][i],
            gaps["pt"],
            gaps["it"],
            i,
            eos,
            near_tie_threshold,
        )
        events.append(describe_event(pair, preflight.apply(ev)))
    return events


def _compare(
    record: PromptRecord,
    prompt_ids: list[int],
    a: list[int],
    c: list[int],
    pt_gaps: dict[tuple[int, int], tuple[float, float]],
    it_gaps: dict[tuple[int, int], tuple[float, float]],
    i: int,
    eos: set[int],
    threshold: float | None,
) -> DivergenceEvent:
    """The event lockstep decoding would give from PT's rollout `a` and IT's rollout `c` (IT stopped first)."""
    ev = DivergenceEvent(
        prompt_id=record.id, category=record.category, prompt_ids=prompt_ids, prompt_text=record.text
    )
    k = len(c) - 1  # IT's last step: where it left PT's tokens, or EOS, or the budget
    if c[k] != a[k]:
        ev.diverged, ev.reason, ev.position = True, DIVERGED, k
        ev.t_pt, ev.t_it, ev.prefix_ids = a[k], c[k], list(a[:k])
        (g_pt, m_pt), (g_it, m_it) = pt_gaps[(i, k)], it_gaps[(i, k)]
        if threshold is None:
            mags = bf16_step(torch.tensor([m_pt, m_it], dtype=torch.float32)).tolist()
            tie = g_pt < mags[0] or g_it < mags[1]
        else:
            tie = g_pt < threshold or g_it < threshold
        ev.gap_pt, ev.gap_it, ev.near_tie = g_pt, g_it, bool(tie)
    elif c[k] in eos:
        ev.reason, ev.prefix_ids = EOS_BEFORE_DIVERGENCE, list(a[:k])
    else:
        ev.reason, ev.prefix_ids = NO_DIVERGENCE_IN_BUDGET, list(a[: k + 1])
    return ev


# ---- the 2x2 ---------------------------------------------------------------------------------
@torch.no_grad()
def staged_cells(
    pair: StagedPair,
    events: Sequence[DivergenceEvent],
    plan: tuple[list[int], int],
    readouts: Sequence[str],
    batch_size: int,
    check_noop: bool,
    on_batch: Callable[[int, int], None] | None,
    store: StateStore | None,
) -> pa.Table:
    """The cells table in three phases (IT, PT, IT), one model resident: `crosspatch(staged_pair, ...)`.

    `plan`: (boundaries, headline) from `cells_plan`; `store` bounds the host memory of the stored states
    (None: 2 GiB, then memory-mapped files).
    """
    boundaries, headline = plan
    batches = list(length_batches([e for e in events if e.diverged], batch_size))
    if not batches:
        return CELLS_SCHEMA.empty_table()
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    own = store is None
    store = store or StateStore()
    diffs: dict[str, float] = {}
    scale, dtype = 1.0, torch.float32
    # (batch, upstream, late, boundary) -> [batch, d_model] final residual at the scored position
    finals: dict[tuple[int, str, str, int], torch.Tensor] = {}
    heads: dict[str, Any] = {}
    tables: list[pa.Table] = []
    report: NoopReport | None = None
    n_scored, done = sum(len(b) for b in batches), 0
    try:
        for phase, role in enumerate(("it", "pt", "it")):
            adapter = pair.use(role)
            device = _input_device(adapter)
            if phase == 1 and {"pt", "own"} & set(readouts):
                heads["pt"] = _Head(adapter)  # PT's readout of the last phase's cells
            for k, batch in enumerate(batches):
                ids, mask = left_pad([e.input_ids for e in batch], pad, device)
                tokens = torch.tensor([[e.t_it, e.t_pt] for e in batch], device=device)  # [batch, 2]
                pos = positions_from_mask(mask)  # [batch, seq]
                if phase < 2:  # clean pass: diagonal cell, boundary inputs for the other model's late stack
                    resid = adapter.embed(ids, pos)  # [batch, seq, d_model]
                    ctx = adapter.context(resid, mask, pos)
                    out, captured = adapter.run_layers(resid, ctx, capture_inputs=boundaries)
                    for b in boundaries:
                        finals[(k, role, role, b)] = out[:, -1].to("cpu")
                        store.put((role, k, b), captured[b])
                    if check_noop and k == 0:
                        d, s = role_noop_diffs(
                            role,
                            pair.model(role),
                            adapter,
                            ids,
                            mask,
                            tokens,
                            out[:, -1],
                            captured,
                            ctx,
                            boundaries,
                        )
                        diffs.update(d)
                        scale, dtype = max(scale, s), adapter.dtype
                    del out, captured, resid
                other = "it" if role == "pt" else "pt"
                if phase > 0:  # this model's late stack on the other's stored boundary inputs
                    ctx = None
                    for b in boundaries:
                        upstream = store.get((other, k, b), device)  # [batch, seq, d_model]
                        ctx = ctx or adapter.context(upstream, mask, pos)
                        late = adapter.run_layers(upstream, ctx, start=b)[0][:, -1]  # [batch, d_model]
                        finals[(k, other, role, b)] = late.to("cpu")
                if phase == 2:
                    heads["it"] = adapter
                    cells = _read(heads, finals, k, tokens, boundaries, readouts)
                    tables.append(_cells_table(pair, batch, cells, headline))  # type: ignore[arg-type]
                    for key in [key for key in finals if key[0] == k]:
                        del finals[key]
                    done += len(batch)
                    if on_batch:
                        on_batch(done, n_scored)
            if phase == 1 and check_noop:  # both models checked, before any cell is kept
                report = make_report(dtype, scale, len(batches[0]), boundaries, diffs)
                report.raise_if_failed()
    finally:
        if own:
            store.close()
    table = pa.concat_tables(tables)
    table = table.sort_by([("prompt_id", "ascending"), ("boundary", "ascending"), ("readout", "ascending")])
    return attach(table, report)


def _read(
    heads: dict[str, Any],
    finals: dict[tuple[int, str, str, int], torch.Tensor],
    k: int,
    tokens: torch.Tensor,
    boundaries: Sequence[int],
    readouts: Sequence[str],
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Margins of batch `k`'s four cells per (boundary, readout), as `crosspatch_batch` returns them."""
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for b in boundaries:
        for readout in readouts:
            out[(b, readout)] = {
                col: margin(heads[late if readout == "own" else readout], finals[(k, up, late, b)], tokens)
                for (up, late), col in CELLS.items()
            }
    return out
