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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from crosspatch.engine.adapters import ArchAdapter, adapter_for, positions_from_mask
from crosspatch.engine.divergence import left_pad
from crosspatch.engine.errors import PromptFileError
from crosspatch.engine.hooks import MlpHook, mlp_hooks
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.saes.errors import CacheError, DictionaryConfigError

MANIFEST = "manifest.json"
FORMAT = "crosspatch-activation-cache"
VERSION = 1
HOOK_POINTS: tuple[str, ...] = ("mlp_in", "mlp_out")
ROLES: tuple[str, ...] = ("pt", "it", "model")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# ---- small validated specs --------------------------------------------------------------------------
def parse_layers(spec: str | int | Sequence[int], n_layers: int) -> list[int]:
    """Layer indices from `"last:3"`, `"4,5"`, `"-1"`, an int or a list; negatives count from the end."""
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("last:"):
            try:
                n = int(s.split(":", 1)[1])
            except ValueError:
                n = 0
            if not 1 <= n <= n_layers:
                raise DictionaryConfigError(
                    f"bad layer spec {spec!r}: 'last:N' needs 1 <= N <= {n_layers} (the model has {n_layers} layers)"
                )
            return list(range(n_layers - n, n_layers))
        try:
            items = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise DictionaryConfigError(
                f"bad layer spec {spec!r}: use 'last:N', a comma list like '3,4', or integers"
            ) from None
    elif isinstance(spec, int):
        items = [spec]
    else:
        items = [int(x) for x in spec]
    if not items:
        raise DictionaryConfigError("no layers given; use 'last:N' or explicit indices")
    out = []
    for layer in items:
        if not -n_layers <= layer < n_layers:
            raise DictionaryConfigError(
                f"layer {layer} out of range: the model has {n_layers} layers (valid 0..{n_layers - 1} "
                f"or -{n_layers}..-1)"
            )
        out.append(layer % n_layers)
    return sorted(set(out))


def check_hook_points(hooks: str | Sequence[str]) -> list[str]:
    """Validate hook point names (`mlp_in`, `mlp_out`)."""
    items = [h.strip() for h in hooks.split(",")] if isinstance(hooks, str) else list(hooks)
    bad = [h for h in items if h not in HOOK_POINTS]
    if bad or not items:
        raise DictionaryConfigError(f"unknown hook point(s) {bad or items}; valid: {', '.join(HOOK_POINTS)}")
    return list(dict.fromkeys(items))


def act_key(role: str, layer: int, hook: str) -> str:
    """Tensor name of one activation stream inside a shard."""
    return f"{role}.L{layer}.{hook}"


# ---- token sources ------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TokenSource:
    """Where token sequences come from: `kind` in prompts | text | dataset | ids.

    prompts: JSONL records with `prompt` or `formats`; text: a text file, one sequence per non-empty line;
    dataset: a local `datasets` directory (column `text_column`); ids: JSONL records with `input_ids`, or
    in-memory `ids` (for models without a tokenizer, as in tests).
    """

    kind: str
    path: Path | None = None
    ids: list[list[int]] | None = None
    text_column: str = "text"
    prompt_ids: list[str] | None = None  # prompts: keep only these ids; ids: the prompt id of each sequence
    split: dict[str, Any] | None = None  # how the training prompts were chosen (recorded, see `describe`)

    def fingerprint(self) -> str:
        """A hash of the source's content, stored in the manifest so a resume cannot mix sources."""
        if self.ids is not None:
            return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()
        assert self.path is not None
        if self.kind == "dataset":
            h = hashlib.sha256()
            for p in sorted(self.path.rglob("*")):
                if p.is_file():
                    h.update(p.name.encode() + _sha256_file(p).encode())
            return h.hexdigest()
        return _sha256_file(self.path)

    def describe(self) -> dict[str, Any]:
        """What the manifest (and so every dictionary trained on the cache) records about the source.

        `prompt_ids` lists the prompt ids whose tokens were cached (prompt sources, or id sources built
        from prompts), so mediation can check that no test event's prompt trained the dictionary; `split`
        says how they were chosen (e.g. the mediation fit split). Other sources have `prompt_ids` None
        (a separate corpus, not keyed by prompt id)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "hash": self.fingerprint(),
        }
        ids = self.prompt_ids
        if ids is None and self.kind == "prompts":
            ids = [r.id for r in self._records()]
        if ids is not None:
            out["prompt_ids"] = list(ids)
        if self.split is not None:
            out["split"] = dict(self.split)
        return out

    def _records(self) -> Iterator[PromptRecord]:
        """Prompt records of a `prompts` source (`engine.prompts.load_prompts`), filtered to `prompt_ids`."""
        assert self.path is not None
        keep = set(self.prompt_ids) if self.prompt_ids is not None and self.kind == "prompts" else None
        yield from (r for r in load_prompts(self.path) if keep is None or r.id in keep)

    def texts(self) -> Iterator[str]:
        """Raw texts (not for `ids` sources)."""
        assert self.path is not None
        if self.kind == "text":
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        elif self.kind == "prompts":
            yield from (r.text for r in self._records())
        elif self.kind == "dataset":
            try:
                import datasets  # optional dependency
            except ImportError:
                raise CacheError("a `datasets` source needs the `datasets` package installed") from None
            ds = datasets.load_from_disk(str(self.path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            if self.text_column not in ds.column_names:
                raise CacheError(f"dataset has no column {self.text_column!r}; columns: {ds.column_names}")
            for row in ds:
                yield str(row[self.text_column])
        else:
            raise CacheError(f"source kind {self.kind!r} has no texts")

    def sequences(self, tokenizer: Any | None, max_seq_len: int) -> Iterator[list[int]]:
        """Token id sequences, truncated to `max_seq_len` (BOS added by the tokenizer where it has one)."""
        if self.kind == "ids":
            seqs: Iterable[list[int]] = self.ids if self.ids is not None else self._ids_from_file()
            for s in seqs:
                if s:
                    yield [int(t) for t in s[:max_seq_len]]
            return
        if tokenizer is None:
            raise CacheError(f"a {self.kind!r} source needs a tokenizer; give one or use token-id input")
        for text in self.texts():
            ids = tokenizer.encode(text, add_special_tokens=True)[:max_seq_len]
            if ids:
                yield list(ids)

    def _ids_from_file(self) -> Iterator[list[int]]:
        assert self.path is not None
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield list(json.loads(line)["input_ids"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise PromptFileError(
                            f"{self.path}:{i}: expected a JSON record with 'input_ids'"
                        ) from None


def token_source(spec: str | Path | Sequence[Sequence[int]] | TokenSource) -> TokenSource:
    """Detect a source: a TokenSource, a list of id lists, a `datasets` dir, a .jsonl or a text file."""
    if isinstance(spec, TokenSource):
        return spec
    if not isinstance(spec, (str, Path)):
        return TokenSource(kind="ids", ids=[list(map(int, s)) for s in spec])
    path = Path(spec)
    if not path.exists():
        raise PromptFileError(f"token source {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return TokenSource(kind="dataset", path=path)
        raise PromptFileError(f"{path} is a directory but not a saved `datasets` dataset")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise PromptFileError(f"{path} is empty")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:1: not valid JSON ({e.msg})") from None
        return TokenSource(kind="ids" if "input_ids" in rec else "prompts", path=path)
    return TokenSource(kind="text", path=path)


# ---- model identity -----------------------------------------------------------------------------------
def weight_hash(model: torch.nn.Module, full_below: int = 50_000_000) -> str:
    """sha256 of the weights (all bytes for small models; names, shapes and head/tail slices for big ones)."""
    h = hashlib.sha256()
    n_params = sum(p.numel() for p in model.parameters())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().cpu().contiguous().flatten()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if n_params > full_below:
            t = torch.cat([t[:4096], t[-4096:]])
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return ("sha256:" if n_params <= full_below else "sha256-sampled:") + h.hexdigest()


# ---- capture --------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_mlp(
    adapter: ArchAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    hooks: Sequence[str],
) -> dict[tuple[int, str], torch.Tensor]:
    """Run blocks 0..max(layers) and return {(layer, hook): [batch, seq, d_model]}."""
    position_ids = positions_from_mask(attention_mask)
    resid = adapter.embed(input_ids, position_ids)  # [batch, seq, d_model]
    ctx = adapter.context(resid, attention_mask, position_ids)
    store: dict[tuple[int, str], torch.Tensor] = {}

    def grab(layer: int) -> MlpHook:
        def fn(x: torch.Tensor, out: torch.Tensor) -> None:
            if "mlp_in" in hooks:
                store[(layer, "mlp_in")] = x.detach()  # [batch, seq, d_model]
            if "mlp_out" in hooks:
                store[(layer, "mlp_out")] = out.detach()  # [batch, seq, d_model]

        return fn

    with mlp_hooks(adapter, {layer: grab(layer) for layer in layers}):
        adapter.run_layers(resid, ctx, 0, max(layers) + 1)
    return store


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
    tokenizer: Any | None = None,
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


# ---- reading ------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.exists():
        raise CacheError(f"no activation cache at {str(path)!r} (directory does not exist)")
    if not mpath.exists():
        raise CacheError(f"no activation cache at {str(path)!r} ({MANIFEST} missing)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"corrupt cache manifest {mpath}: {e.msg}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CacheError(f"{mpath} is not a crosspatch activation cache manifest")
    return m


def is_heldout(seq_index: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prompt-level held-out split: a fixed hash of the sequence index, so it never depends on sharding."""
    h = (seq_index.long() * 2654435761) % (2**32)
    return h.double() / 2**32 < fraction  # [n] bool


class ActivationSource(Protocol):
    """What training and quality read from cached activations: `ActivationCache` on disk, `TensorSource`
    in memory (tests, synthetic data)."""

    path: Path | None
    manifest: dict[str, Any]

    @property
    def d_model(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def check_key(self, role: str, layer: int, hook: str) -> str: ...

    def load(
        self, keys: Sequence[str], split: str = "all", heldout_fraction: float = 0.1
    ) -> torch.Tensor: ...

    def sequences(self, split: str = "heldout", heldout_fraction: float = 0.1) -> list[list[int]]: ...

    def batches(
        self,
        keys: Sequence[str],
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.1,
        start_sample: int = 0,
    ) -> Iterator[torch.Tensor]: ...


class ActivationCache:
    """Read access to a finished cache: keys, held-out splits, deterministic shuffled batches."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest.get("complete") and not allow_incomplete:
            raise CacheError(
                f"cache at {self.path} is incomplete (interrupted?); rerun `dict cache` to resume"
            )
        for s in self.manifest["shards"]:
            if not (self.path / s["file"]).exists():
                raise CacheError(f"cache at {self.path} is missing shard {s['file']}")

    @property
    def roles(self) -> list[str]:
        return list(self.manifest["models"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def hook_points(self) -> list[str]:
        return list(self.manifest["hook_points"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def check_key(self, role: str, layer: int, hook: str) -> str:
        """The tensor name for (role, layer, hook), or a `CacheError` listing what the cache holds."""
        if role not in self.roles:
            raise CacheError(f"cache has no model role {role!r}; it holds {', '.join(self.roles)}")
        if layer not in self.layers:
            raise CacheError(f"cache has no layer {layer}; it holds layers {self.layers}")
        if hook not in self.hook_points:
            raise CacheError(f"cache has no hook point {hook!r}; it holds {', '.join(self.hook_points)}")
        return act_key(role, layer, hook)

    def _open(self, shard: dict[str, Any]) -> Any:
        return safe_open(str(self.path / shard["file"]), framework="pt")

    def load(self, keys: Sequence[str], split: str = "all", heldout_fraction: float = 0.1) -> torch.Tensor:
        """All rows of `keys` side by side, `[n, sum(d)]` float32 (for small caches and evals)."""
        parts = [self._shard_rows(s, keys, split, heldout_fraction) for s in self.manifest["shards"]]
        return torch.cat(parts) if parts else torch.empty(0, len(keys) * self.d_model)

    def _shard_rows(
        self, shard: dict[str, Any], keys: Sequence[str], split: str, heldout_fraction: float
    ) -> torch.Tensor:
        if split not in ("all", "train", "heldout"):
            raise DictionaryConfigError(f"unknown split {split!r}; valid: all, train, heldout")
        with self._open(shard) as f:
            x = torch.cat([f.get_tensor(k).float() for k in keys], dim=-1)  # [n, sum(d)]
            if split != "all":
                held = is_heldout(f.get_tensor("seq_index"), heldout_fraction)
                x = x[held if split == "heldout" else ~held]
        return x

    def sequences(self, split: str = "heldout", heldout_fraction: float = 0.1) -> list[list[int]]:
        """Full token ids (with BOS) of cached sequences in `split`, for splicing evals."""
        out: list[list[int]] = []
        for s in self.manifest["shards"]:
            with self._open(s) as f:
                toks, offs, ids = (
                    f.get_tensor("seq_tokens"),
                    f.get_tensor("seq_offsets"),
                    f.get_tensor("seq_ids"),
                )
            held = is_heldout(ids, heldout_fraction)
            for i in range(len(ids)):
                if split == "all" or bool(held[i]) == (split == "heldout"):
                    out.append(toks[offs[i] : offs[i + 1]].tolist())
        return out

    def batches(
        self,
        keys: Sequence[str],
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.1,
        start_sample: int = 0,
    ) -> Iterator[torch.Tensor]:
        """An endless, deterministic stream of `[batch_size, sum(d)]` batches.

        Each epoch visits the shards in a seeded order and each shard's rows in a seeded order; the stream
        is cut into consecutive batches. `start_sample` starts the stream there (resume after a kill),
        skipping whole shards without reading their activations.
        """
        shards = self.manifest["shards"]
        counts = []
        for s in shards:  # rows per shard in this split (reads only seq_index)
            with self._open(s) as f:
                held = is_heldout(f.get_tensor("seq_index"), heldout_fraction)
            counts.append(
                int(held.sum())
                if split == "heldout"
                else int((~held).sum())
                if split == "train"
                else len(held)
            )
        total = sum(counts)
        if total < batch_size:
            raise CacheError(f"cache split {split!r} has {total} rows, fewer than one batch of {batch_size}")
        buf: torch.Tensor | None = None
        skip = start_sample
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(shards), generator=g).tolist()
            for si in order:
                if skip >= counts[si]:
                    skip -= counts[si]
                    continue
                rows = self._shard_rows(shards[si], keys, split, heldout_fraction)
                gs = torch.Generator().manual_seed(seed * 100_003 + epoch * 7919 + si + 1)
                rows = rows[torch.randperm(len(rows), generator=gs)][skip:]
                skip = 0
                buf = rows if buf is None else torch.cat([buf, rows])
                while len(buf) >= batch_size:
                    yield buf[:batch_size]
                    buf = buf[batch_size:]
            epoch += 1


class TensorSource:
    """In-memory stand-in for `ActivationCache` (synthetic data, tests): `{key: [n, d]}` tensors.

    Rows play the role of sequences for the held-out split; batches are deterministic in `seed`.
    """

    def __init__(self, arrays: Mapping[str, torch.Tensor], manifest: dict[str, Any] | None = None) -> None:
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise CacheError("all arrays of a TensorSource need the same number of rows")
        self.arrays = {k: v.float() for k, v in arrays.items()}
        self.n_rows = lengths.pop()
        self.d_model = next(iter(self.arrays.values())).shape[-1]
        self.path: Path | None = None
        self.manifest = manifest or {"models": {}, "source": {"kind": "tensors"}, "n_tokens": self.n_rows}

    @property
    def n_tokens(self) -> int:
        return self.n_rows

    def check_key(self, role: str, layer: int, hook: str) -> str:
        key = act_key(role, layer, hook)
        if key not in self.arrays:
            raise CacheError(f"no activations for {key!r}; available: {', '.join(self.arrays)}")
        return key

    def _mask(self, split: str, heldout_fraction: float) -> torch.Tensor:
        if split == "all":
            return torch.ones(self.n_rows, dtype=torch.bool)
        if split not in ("train", "heldout"):
            raise DictionaryConfigError(f"unknown split {split!r}; valid: all, train, heldout")
        held = is_heldout(torch.arange(self.n_rows), heldout_fraction)
        return held if split == "heldout" else ~held

    def load(self, keys: Sequence[str], split: str = "all", heldout_fraction: float = 0.1) -> torch.Tensor:
        return torch.cat([self.arrays[k] for k in keys], dim=-1)[self._mask(split, heldout_fraction)]

    def sequences(self, split: str = "heldout", heldout_fraction: float = 0.1) -> list[list[int]]:
        return []

    def batches(
        self,
        keys: Sequence[str],
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.1,
        start_sample: int = 0,
    ) -> Iterator[torch.Tensor]:
        x = self.load(keys, split, heldout_fraction)  # [n, sum(d)]
        n = len(x)
        if n < batch_size:
            raise CacheError(f"split {split!r} has {n} rows, fewer than one batch of {batch_size}")
        epoch, offset = divmod(start_sample, n)
        buf: torch.Tensor | None = None
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            rows = x[torch.randperm(n, generator=g)][offset:]
            offset = 0
            buf = rows if buf is None else torch.cat([buf, rows])
            while len(buf) >= batch_size:
                yield buf[:batch_size]
                buf = buf[batch_size:]
            epoch += 1
