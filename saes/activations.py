"""Reading cached activations: `ActivationCache` (a finished cache on disk), `TensorSource` (in memory),
and `ActivationSource`, the Protocol training and quality read."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from crosspatch.saes.cache_specs import FORMAT, MANIFEST, act_key
from crosspatch.saes.errors import CacheError, DictionaryConfigError, read_json_object


# ---- reading ------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    mpath, m = read_json_object(path, MANIFEST, "activation cache", CacheError)
    if m.get("format") != FORMAT:
        raise CacheError(f"{mpath} is not a crosspatch activation cache manifest")
    return m


def _rebatch(chunks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut a stream of row chunks `[n_i, d]` into consecutive `[batch_size, d]` batches (resumable streams)."""
    buf: torch.Tensor | None = None
    for rows in chunks:
        buf = rows if buf is None else torch.cat([buf, rows])  # [n_buf, d]
        while len(buf) >= batch_size:
            yield buf[:batch_size]
            buf = buf[batch_size:]


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

    def split_size(self, split: str, heldout_fraction: float = 0.1) -> int: ...

    def chunks(
        self, keys: Sequence[str], seed: int, split: str, heldout_fraction: float, start_sample: int
    ) -> Iterator[torch.Tensor]:
        """Seeded, shuffled `[rows, sum(d)]` chunks of the split, epoch after epoch, from `start_sample` on."""
        ...

    def batches(
        self,
        keys: Sequence[str],
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.1,
        start_sample: int = 0,
    ) -> Iterator[torch.Tensor]:
        """An endless, deterministic stream of `[batch_size, sum(d)]` batches; `start_sample` resumes it
        there (after a kill) without replaying what came before."""
        n = self.split_size(split, heldout_fraction)
        if n < batch_size:
            raise CacheError(f"split {split!r} has {n} rows, fewer than one batch of {batch_size}")
        yield from _rebatch(self.chunks(keys, seed, split, heldout_fraction, start_sample), batch_size)


class ActivationCache(ActivationSource):
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

    def _split_counts(self, split: str, heldout_fraction: float) -> list[int]:
        """Rows per shard in this split (reads only seq_index)."""
        counts = []
        for s in self.manifest["shards"]:
            with self._open(s) as f:
                held = is_heldout(f.get_tensor("seq_index"), heldout_fraction)
            counts.append(
                int(held.sum())
                if split == "heldout"
                else int((~held).sum())
                if split == "train"
                else len(held)
            )
        return counts

    def split_size(self, split: str, heldout_fraction: float = 0.1) -> int:
        return sum(self._split_counts(split, heldout_fraction))

    def chunks(
        self, keys: Sequence[str], seed: int, split: str, heldout_fraction: float, start_sample: int
    ) -> Iterator[torch.Tensor]:
        """Each epoch visits the shards in a seeded order and each shard's rows in a seeded order;
        `start_sample` skips whole shards without reading their activations."""
        shards = self.manifest["shards"]
        counts = self._split_counts(split, heldout_fraction)
        skip = start_sample
        for epoch in itertools.count():
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            for si in torch.randperm(len(shards), generator=g).tolist():
                if skip >= counts[si]:
                    skip -= counts[si]
                    continue
                rows = self._shard_rows(shards[si], keys, split, heldout_fraction)
                gs = torch.Generator().manual_seed(seed * 100_003 + epoch * 7919 + si + 1)
                yield rows[torch.randperm(len(rows), generator=gs)][skip:]
                skip = 0


class TensorSource(ActivationSource):
    """In-memory stand-in for `ActivationCache` (synthetic data, tests): `{key: [n, d]}` tensors.

    Rows play the role of sequences for the held-out split; batches are deterministic in `seed`.
    """

    def __init__(self, arrays: Mapping[str, torch.Tensor], manifest: dict[str, Any] | None = None) -> None:
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise CacheError("all arrays of a TensorSource need the same number of rows")
        self.arrays = {k: v.float() for k, v in arrays.items()}
        self.n_rows = lengths.pop()
        self.path: Path | None = None
        self.manifest = manifest or {"models": {}, "source": {"kind": "tensors"}, "n_tokens": self.n_rows}

    @property
    def d_model(self) -> int:
        return next(iter(self.arrays.values())).shape[-1]

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

    def split_size(self, split: str, heldout_fraction: float = 0.1) -> int:
        return int(self._mask(split, heldout_fraction).sum())

    def chunks(
        self, keys: Sequence[str], seed: int, split: str, heldout_fraction: float, start_sample: int
    ) -> Iterator[torch.Tensor]:
        """One seeded permutation of the split per epoch, entered mid-epoch at `start_sample`."""
        x = self.load(keys, split, heldout_fraction)  # [n, sum(d)]
        n = len(x)
        first, offset = divmod(start_sample, n)
        for epoch in itertools.count(first):
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            yield x[torch.randperm(n, generator=g)][offset if epoch == first else 0 :]
