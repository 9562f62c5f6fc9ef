"""The activation cache's format constants and small validated specs (layers, hook points, keys)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crosspatch.saes.errors import DictionaryConfigError

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
