"""Model organisms: tiny PT/IT pairs whose cross-patching answer is known (constructed) or realistic (trained).

    >>> from engine.organisms import list_organisms, organism_path
    >>> root = organism_path("llama_upstream_dependent")   # built into the cache on first use (~seconds)
    >>> pair = load_pair(root / "pt", root / "it")          # plain HF directories

Constructed organisms (`<family>_<kind>`) are built on first use into `$CROSSPATCH_CACHE_DIR/organisms`
(default `~/.cache/crosspatch/organisms`), keyed by builder version and seed. Trained organisms
(`trained_<family>`) ship with the package under `engine/organisms/shipped/`. See docs/organisms.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from crosspatch.engine.organisms.build import BUILDER_VERSION, build_atomic, build_constructed, cache_root
from crosspatch.engine.organisms.constructed import CONSTRUCTED_FAMILIES, FAMILY_KINDS

SHIPPED_DIR = Path(__file__).parent / "shipped"
TRAINED_FAMILIES: tuple[str, ...] = ("llama", "qwen3", "gpt2")

CONSTRUCTED: dict[str, tuple[str, str]] = {
    f"{family}_{kind}": (kind, family) for family in CONSTRUCTED_FAMILIES for kind in FAMILY_KINDS[family]
}
TRAINED: tuple[str, ...] = tuple(f"trained_{family}" for family in TRAINED_FAMILIES)


def list_organisms(kind: str | None = None) -> list[str]:
    """Organism names; `kind` = "constructed" or "trained" narrows the list."""
    if kind not in (None, "constructed", "trained"):
        raise ValueError(f"kind must be None, 'constructed' or 'trained', not {kind!r}")
    names: list[str] = []
    if kind in (None, "constructed"):
        names += list(CONSTRUCTED)
    if kind in (None, "trained"):
        names += list(TRAINED)
    return names


def organism_path(
    name: str, seed: int = 0, cache_dir: str | Path | None = None, rebuild: bool = False
) -> Path:
    """Directory of organism `name` (with `pt/`, `it/`, `expected.json`, `prompts.jsonl`).

    Constructed organisms are built on first use (atomically) into the cache; `rebuild=True` rebuilds.
    Trained organisms are the shipped files; `seed`, `cache_dir` and `rebuild` do not apply to them.
    """
    if name in TRAINED:
        path = SHIPPED_DIR / name
        if not (path / "expected.json").is_file():
            raise FileNotFoundError(
                f"shipped organism {name!r} is missing at {path}; run scripts/train_organisms.py"
            )
        return path
    if name not in CONSTRUCTED:
        raise ValueError(f"unknown organism {name!r}; choose one of {', '.join(list_organisms())}")
    kind, family = CONSTRUCTED[name]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{name}-v{BUILDER_VERSION}-seed{seed}"
    if rebuild and final.exists():
        shutil.rmtree(final)
    if not (final / "expected.json").is_file():
        build_atomic(final, lambda out: build_constructed(kind, family, seed, out))
    return final


def load_expected(name: str, **kwargs: Any) -> dict[str, Any]:
    """The organism's expected.json (builds a constructed organism first if needed)."""
    return json.loads((organism_path(name, **kwargs) / "expected.json").read_text())


__all__ = ["CONSTRUCTED", "TRAINED", "list_organisms", "load_expected", "organism_path"]
