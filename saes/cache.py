"""Activation cache: MLP inputs/outputs of chosen layers, streamed to sharded safetensors files.

Why a cache: dictionaries train for many passes over millions of tokens, and paired crosscoders need PT and
IT activations on *identical* tokens. Running the models once and storing the activations makes training
cheap, repeatable and resumable.

Layout of a cache directory:

    manifest.json              what was cached (models + weight hash, layers, hook points, dtype, source
                               hash, settings) and the list of finished shards; rewritten atomically
    shard_00000.safetensors    one tensor per (role, layer, hook point): "<role>.L<layer>.<hook>" [n, d]
                               plus token_ids [n], seq_index [n], position [n] and the full token ids of
                               the shard's sequences (seq_tokens, seq_offsets, seq_ids) for splicing evals.

Shards always end at a model-batch boundary, so an interrupted run that restarts (same settings) resumes
at the first unfinished batch and produces byte-identical shards. Memory is bounded by `shard_tokens`
(plus one model batch).

Rooms: `cache_specs` (format constants, layer/hook specs), `tokens` (token sources), `capture` (weight hash,
MLP capture), this module (the writer, `build_cache`), `activations` (the reader). Every public name is
re-exported here, so `from crosspatch.saes.cache import ActivationCache` keeps working.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.adapters import adapter_for
from crosspatch.engine.divergence import left_pad
from crosspatch.saes.activations import (
    ActivationCache,
    ActivationSource,
    TensorSource,
    _read_manifest,
    is_heldout,
)
from crosspatch.saes.cache_specs import (
    DTYPES,
    FORMAT,
    HOOK_POINTS,
    MANIFEST,
    ROLES,
    VERSION,
    act_key,
    check_hook_points,
    parse_layers,
)
from crosspatch.saes.capture import capture_mlp, weight_hash
from crosspatch.saes.errors import CacheError, DictionaryConfigError
from crosspatch.saes.tokens import TokenSource, _sha256_file, token_source


# ---- writing ---------------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _batched(it: Iterable[list[int]], n: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_cache(
    out_dir: str | Path,
    models: PreTrainedModel | Mapping[str, PreTrainedModel],
    source: str | Path | Sequence[Sequence[int]] | TokenSource,
    layers: str | int | Sequence[int] = "last:3",
    hook_points: str | Sequence[str] = ("mlp_in", "mlp_out"),
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    model_paths: Mapping[str, str] | None = None,
    revisions: Mapping[str, str | None] | None = None,
    shard_tokens: int = 65536,
    batch_size: int = 8,
    max_seq_len: int = 512,
    max_tokens: int | None = None,
    dtype: str = "float32",
    drop_token_ids: Sequence[int] | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> ActivationCache:
    """Cache MLP activations of `models` (one model, or {"pt": ..., "it": ...} for paired mode) on `source`.

    Paired models see the same token ids (the first model's tokenizer). Pad positions and `drop_token_ids`
    (default: BOS and pad ids of the config/tokenizer, plus the tokenizer's special ids) are not stored.
    An existing directory with the same settings is resumed; different settings raise `CacheError`.
    `max_tokens` stops after the shard that reaches it. `on_shard(shard_record)` runs after each shard.
    """
    out = Path(out_dir)
    if isinstance(models, PreTrainedModel):
        models = {"model": models}
    bad_roles = [r for r in models if r not in ROLES]
    if bad_roles or not models:
        raise DictionaryConfigError(
            f"model roles {bad_roles or list(models)} invalid; use {', '.join(ROLES)}"
        )
    if dtype not in DTYPES:
        raise DictionaryConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if shard_tokens < 1 or batch_size < 1 or max_seq_len < 1:
        raise DictionaryConfigError("shard_tokens, batch_size and max_seq_len must be positive")
    adapters = {role: adapter_for(m) for role, m in models.items()}
    first = next(iter(adapters.values()))
    for role, ad in adapters.items():
        if ad.n_layers != first.n_layers or ad.d_model != first.d_model:
            raise CacheError(f"paired models differ in shape: {role} has {ad.n_layers} layers x {ad.d_model}")
    layer_list = parse_layers(layers, first.n_layers)
    hooks = check_hook_points(hook_points)
    src = token_source(source)
    cfg0 = first.config
    drop = set(drop_token_ids) if drop_token_ids is not None else _default_drop_ids(cfg0, tokenizer)
    pad_id = next(iter(sorted(drop)), 0) if getattr(cfg0, "pad_token_id", None) is None else cfg0.pad_token_id

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "models": {
            role: {
                "path": (model_paths or {}).get(role) or getattr(m.config, "_name_or_path", "") or None,
                "revision": (revisions or {}).get(role) or getattr(m.config, "_commit_hash", None),
                "weight_hash": weight_hash(m),
                "model_type": adapters[role].model_type,
                "n_layers": adapters[role].n_layers,
                "d_model": adapters[role].d_model,
            }
            for role, m in models.items()
        },
        "paired": len(models) > 1,
        # how the models ran (device, dtype of their weights); not compared on resume
        "model_load": {
            role: {"device": str(ad.device), "dtype": str(next(m.parameters()).dtype).removeprefix("torch.")}
            for (role, m), ad in zip(models.items(), adapters.values(), strict=True)
        },
        # HF module path of each cached layer's MLP per role (e.g. "model.layers.31.mlp"): hook_point
        # mlp_out is that module's output, mlp_in its input. Not compared on resume.
        "hf_modules": {
            role: {str(layer): _module_name(m, adapters[role].mlp(layer)) for layer in layer_list}
            for role, m in models.items()
        },
        "layers": layer_list,
        "hook_points": hooks,
        "dtype": dtype,
        "d_model": first.d_model,
        "source": src.describe(),
        "settings": {
            "max_seq_len": max_seq_len,
            "batch_size": batch_size,
            "shard_tokens": shard_tokens,
            "max_tokens": max_tokens,
            "drop_token_ids": sorted(drop),
        },
        "shards": [],
        "n_tokens": 0,
        "n_sequences": 0,
        "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST
    if mpath.exists():
        old = _read_manifest(out)
        keys = ("models", "layers", "hook_points", "dtype", "source", "settings")
        diff = [k for k in keys if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(manifest[k]))]
        if diff:
            raise CacheError(
                f"{out} already holds a cache with different {', '.join(diff)}; use a new directory"
            )
        manifest = old
        if manifest["complete"]:
            return ActivationCache(out)
    done_seqs = manifest["shards"][-1]["seq_end"] if manifest["shards"] else 0
    torch_dtype = DTYPES[dtype]

    pending: dict[str, list[torch.Tensor]] = {}
    seq_records: list[tuple[int, list[int]]] = []
    n_pending = 0

    def flush(seq_end: int) -> None:
        nonlocal pending, seq_records, n_pending
        idx = len(manifest["shards"])
        name = f"shard_{idx:05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
        seq_tokens = [t for _, s in seq_records for t in s]
        offsets = np.cumsum([0] + [len(s) for _, s in seq_records])
        tensors["seq_tokens"] = torch.tensor(seq_tokens, dtype=torch.long)
        tensors["seq_offsets"] = torch.tensor(offsets, dtype=torch.long)
        tensors["seq_ids"] = torch.tensor([i for i, _ in seq_records], dtype=torch.long)
        tmp = out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, out / name)
        rec = {
            "file": name,
            "n_tokens": n_pending,
            "n_sequences": len(seq_records),
            "seq_start": seq_records[0][0],
            "seq_end": seq_end,
            "sha256": _sha256_file(out / name),
        }
        manifest["shards"].append(rec)
        manifest["n_tokens"] += n_pending
        manifest["n_sequences"] += len(seq_records)
        _atomic_json(mpath, manifest)
        pending, seq_records, n_pending = {}, [], 0
        if on_shard is not None:
            on_shard(rec)

    seq_index = 0
    reached = manifest["n_tokens"] >= max_tokens if max_tokens else False
    for batch in _batched(src.sequences(tokenizer, max_seq_len), batch_size):
        if reached:
            break
        start = seq_index
        seq_index += len(batch)
        if seq_index <= done_seqs:
            continue  # finished in an earlier run
        ids, mask = left_pad(batch, pad_id, "cpu")  # [batch, seq]
        keep = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(drop), dtype=torch.long))  # [batch, seq]
        for role, ad in adapters.items():
            acts = capture_mlp(ad, ids.to(ad.device), mask.to(ad.device), layer_list, hooks)
            for (layer, hook), a in acts.items():
                flat = a.to("cpu", torch_dtype)[keep]  # [n_kept, d_model]
                pending.setdefault(act_key(role, layer, hook), []).append(flat)
        rows = keep.nonzero()  # [n_kept, 2]: (row in batch, position)
        pending.setdefault("token_ids", []).append(ids[keep])
        pending.setdefault("seq_index", []).append(rows[:, 0] + start)
        pending.setdefault("position", []).append(rows[:, 1] - (mask.shape[1] - mask.sum(1))[rows[:, 0]])
        seq_records.extend((start + i, s) for i, s in enumerate(batch))
        n_pending += int(keep.sum())
        if n_pending >= shard_tokens:
            flush(seq_index)
            reached = bool(max_tokens) and manifest["n_tokens"] >= max_tokens
    if n_pending:
        flush(seq_index)
    if manifest["n_tokens"] == 0:
        raise CacheError("the token source produced no tokens to cache (empty source or all dropped)")
    manifest["complete"] = True
    _atomic_json(mpath, manifest)
    return ActivationCache(out)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """The dotted path of `module` inside `model` (as `named_modules` spells it)."""
    return next((name for name, m in model.named_modules() if m is module), None)


def _default_drop_ids(config: Any, tokenizer: Any | None) -> set[int]:
    ids = {getattr(config, "bos_token_id", None), getattr(config, "pad_token_id", None)}
    if tokenizer is not None:
        ids |= {tokenizer.bos_token_id, tokenizer.pad_token_id}
        ids |= set(getattr(tokenizer, "all_special_ids", []) or [])
    return {int(i) for i in ids if isinstance(i, int)}


__all__ = [
    "DTYPES",
    "FORMAT",
    "HOOK_POINTS",
    "MANIFEST",
    "ROLES",
    "VERSION",
    "ActivationCache",
    "ActivationSource",
    "TensorSource",
    "TokenSource",
    "act_key",
    "build_cache",
    "capture_mlp",
    "check_hook_points",
    "is_heldout",
    "parse_layers",
    "token_source",
    "weight_hash",
]
