"""Model pairs: a PT (base) and IT (instruction-tuned) checkpoint loaded side by side.

A pair shares one token space: `check_same_ids` validates that both tokenizers encode every prompt to
identical ids (the method's raw-shared requirement), and both models must have the same depth and width
so that a residual from one can enter the other's late stack.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.adapters import ArchAdapter, adapter_for
from crosspatch.engine.errors import CrosspatchError, ModelLoadError, TokenizerMismatchError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
Readout = Literal["it", "pt", "own"]
READOUTS: tuple[str, ...] = ("it", "pt", "own")
DEFAULT_BOUNDARY_FRACTION = 0.6
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate strategies


def check_readout(readout: str) -> None:
    """Refuse a readout that is not one of `READOUTS`, naming the valid ones."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose from {', '.join(READOUTS)}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`/`"bfloat16"`/`torch.bfloat16` -> `torch.bfloat16`; an unknown name is a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CrosspatchError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | Path,
    *,
    device: str | dict[str, int | str] = "cpu",
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    require_tokenizer: bool = True,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer by hub id or local path (`trust_remote_code` is never on).

    `device` is `cpu`, `cuda`, `cuda:N`, or an accelerate device map for models larger than one GPU: a
    strategy (`auto`, `balanced`, `balanced_low_0`, `sequential`, bounded per device by `max_memory`, e.g.
    `{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`) or an explicit `{module: device}` map, where `"cpu"` and
    `"disk"` offload blocks (disk weights under `offload_folder`). The adapters move the residual to each
    block's device. Without `require_tokenizer`, a model saved without one loads with `None`.
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise ModelLoadError(f"model path {name!r} has no config.json (is it a saved HF model directory?)")
    torch_dtype = resolve_dtype(dtype)
    device_map = device if isinstance(device, dict) or device in DEVICE_MAPS else None
    if max_memory is not None and device_map is None:
        raise CrosspatchError(
            f"max_memory needs a device map (one of {', '.join(DEVICE_MAPS)}), not {device!r}"
        )
    source = str(local) if local.exists() else name
    extra: dict[str, object] = {}
    if max_memory is not None:
        extra["max_memory"] = max_memory
    if offload_folder is not None:
        extra["offload_folder"] = str(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            trust_remote_code=False,
            device_map=device_map,
            revision=revision,
            **extra,
        )
    except Exception as e:  # HF raises many types (OSError, ValueError, HFValidationError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model {name!r}: {first}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, revision=revision)
    except Exception as e:
        if require_tokenizer:
            raise ModelLoadError(f"could not load the tokenizer of {name!r}: {str(e).strip()[:200]}") from e
        tokenizer = None
    if device_map is None:
        model = model.to(str(device))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def weights_fingerprint(model: PreTrainedModel, n_bytes: int = 1 << 20) -> str:
    """A short content hash of config + weights (a revision stand-in for local checkpoints)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().flatten()[: n_bytes // 4].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.all_special_tokens], default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def headline_of(boundaries: Sequence[int], n_layers: int) -> int:
    """The headline boundary among a job's resolved `boundaries` of an `n_layers`-deep pair.

    One boundary (an index or a fraction the job names) is its own headline; of several (a sweep or a
    list) the method's default round(0.6 x L) when swept, else the swept one nearest it (ties: lower).
    """
    if not boundaries:
        raise CrosspatchError("no boundaries: a job needs at least one")
    default = round(DEFAULT_BOUNDARY_FRACTION * n_layers)
    if len(boundaries) == 1:
        return int(boundaries[0])
    return int(min(boundaries, key=lambda b: (abs(b - default), b)))


def pair_identity(
    pt: str | Path, it: str | Path, pt_revision: str | None = None, it_revision: str | None = None
) -> tuple[str, str]:
    """(pair_id, pair_label) of a pair loaded by name or path.

    The label is the two folder (or hub) names, `llama-pt~llama-it`; the id appends a short hash of the
    resolved local paths (or hub ids) and revisions, so `a/llama-pt, a/llama-it` and `b/llama-pt,
    b/llama-it` get different ids while the same checkpoints always get the same one.
    """
    parts = []
    for ref, rev in ((pt, pt_revision), (it, it_revision)):
        local = Path(str(ref)).expanduser()
        parts.append(f"{local.resolve() if local.exists() else str(ref)}@{rev or ''}")
    label = f"{Path(str(pt)).name}~{Path(str(it)).name}"
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]
    return f"{label}-{digest}", label


def resolve_identity(
    pt: str | Path,
    it: str | Path,
    pt_revision: str | None,
    it_revision: str | None,
    pair_id: str | None,
    pair_label: str | None,
) -> tuple[str, str]:
    """(pair_id, pair_label) a loader records: the caller's, else `pair_identity`'s (a given id is its label)."""
    derived_id, derived_label = pair_identity(pt, it, pt_revision, it_revision)
    return pair_id or derived_id, pair_label or (pair_id if pair_id else derived_label)


@dataclass
class ModelPair:
    """A PT/IT pair with adapters; `tokenizer` (PT's) supplies the shared ids for both models."""

    pt: PreTrainedModel
    it: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    it_tokenizer: PreTrainedTokenizerBase
    family: str
    pair_id: str
    pt_adapter: ArchAdapter
    it_adapter: ArchAdapter
    pair_label: str = ""  # human label (folder or organism names); `pair_id` is the unique key

    @classmethod
    def from_models(
        cls,
        pt: PreTrainedModel,
        it: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        it_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        family: str | None = None,
        pair_id: str | None = None,
        pair_label: str | None = None,
    ) -> ModelPair:
        """Wrap two loaded models; checks that their shapes allow cross-patching."""
        pt_adapter, it_adapter = adapter_for(pt), adapter_for(it)
        if (pt_adapter.n_layers, pt_adapter.d_model) != (it_adapter.n_layers, it_adapter.d_model):
            raise CrosspatchError(
                f"PT and IT shapes differ: PT has {pt_adapter.n_layers} layers x d_model {pt_adapter.d_model}, "
                f"IT has {it_adapter.n_layers} x {it_adapter.d_model}; cross-patching needs equal shapes"
            )
        family = family or pt_adapter.family
        pair_id = pair_id or f"{family}-pair"
        return cls(
            pt=pt,
            it=it,
            tokenizer=tokenizer,
            it_tokenizer=it_tokenizer or tokenizer,
            family=family,
            pair_id=pair_id,
            pt_adapter=pt_adapter,
            it_adapter=it_adapter,
            pair_label=pair_label or pair_id,
        )

    @property
    def n_layers(self) -> int:
        return self.pt_adapter.n_layers

    @property
    def default_boundary(self) -> int:
        """The method's late-stack start: round(0.6 x n_layers)."""
        return round(DEFAULT_BOUNDARY_FRACTION * self.n_layers)

    def headline_boundary(self, boundary: int | float | str | Sequence[int] | None) -> int:
        """The one boundary a job's headline numbers use (see `headline_of`)."""
        return headline_of(self.resolve_boundaries(boundary), self.n_layers)

    def adapter(self, role: Literal["pt", "it"]) -> ArchAdapter:
        return self.pt_adapter if role == "pt" else self.it_adapter

    def resolve_boundaries(self, boundary: int | float | str | Sequence[int] | None) -> list[int]:
        """`None` -> default; a fraction in (0,1) -> round(f x L); an int; a list; `"sweep"` -> 1..L-1."""
        n = self.n_layers
        if boundary is None:
            return [self.default_boundary]
        if isinstance(boundary, str):
            if boundary == "sweep":
                return list(range(1, n))
            try:
                boundary = float(boundary) if "." in boundary else int(boundary)
            except ValueError:
                raise CrosspatchError(
                    f"boundary {boundary!r} is not a fraction (e.g. 0.6), a layer index, or 'sweep'"
                ) from None
        if isinstance(boundary, float):
            if not 0.0 < boundary < 1.0:
                raise CrosspatchError(f"boundary fraction {boundary} must lie in (0, 1)")
            return [round(boundary * n)]
        values = [boundary] if isinstance(boundary, int) else list(boundary)
        if not values:
            raise CrosspatchError("boundary list is empty")
        for b in values:
            if not isinstance(b, int) or not 0 <= b <= n:
                raise CrosspatchError(
                    f"boundary {b!r} out of range: this pair has {n} layers (valid: 0..{n})"
                )
        return sorted(set(values))

    def check_same_ids(self, prompts: Iterable[tuple[str, str]]) -> None:
        """Raise on the first prompt `(id, text)` whose PT and IT token ids differ."""
        if self.it_tokenizer is self.tokenizer:
            return
        for prompt_id, text in prompts:
            a = self.tokenizer.encode(text, add_special_tokens=True)
            b = self.it_tokenizer.encode(text, add_special_tokens=True)
            if a != b:
                at = next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
                )
                raise TokenizerMismatchError(
                    f"PT and IT tokenizers disagree on prompt {prompt_id!r} at token {at} "
                    f"(PT {a[at : at + 3]} vs IT {b[at : at + 3]}); cross-patching needs identical ids"
                )

    def provenance(self) -> dict[str, str]:
        """Hashes that identify this pair's weights and tokenizer (for result provenance)."""
        return {
            "pt_weights": weights_fingerprint(self.pt),
            "it_weights": weights_fingerprint(self.it),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "pt_name": str(getattr(self.pt.config, "_name_or_path", "")),
            "it_name": str(getattr(self.it.config, "_name_or_path", "")),
        }


def load_pair(
    pt: str | Path,
    it: str | Path,
    *,
    device: str | dict[str, int | str] = "cpu",
    dtype: str | torch.dtype = "float32",
    family: str | None = None,
    pair_id: str | None = None,
    pair_label: str | None = None,
    pt_revision: str | None = None,
    it_revision: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> ModelPair:
    """Load PT and IT by id or path onto `device` in `dtype` and wrap them as a `ModelPair`.

    Without `pair_id` the id is `pair_identity`'s (names + hash of resolved paths and revisions); a
    caller that passes one (an allow-list key, an organism name) vouches that it is unique.
    """
    spread = dict(max_memory=max_memory)  # accelerate: each model fills the devices within max_memory
    pt_off = it_off = None
    if offload_folder is not None:
        pt_off, it_off = Path(offload_folder) / "pt", Path(offload_folder) / "it"
    pt_model, pt_tok = load_model(
        pt, device=device, dtype=dtype, revision=pt_revision, offload_folder=pt_off, **spread
    )
    it_model, it_tok = load_model(
        it, device=device, dtype=dtype, revision=it_revision, offload_folder=it_off, **spread
    )
    pair_id, pair_label = resolve_identity(pt, it, pt_revision, it_revision, pair_id, pair_label)
    return ModelPair.from_models(
        pt_model, it_model, pt_tok, it_tok, family=family, pair_id=pair_id, pair_label=pair_label
    )
