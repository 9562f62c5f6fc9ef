"""crosspatch: first-divergence cross-patching of PT/IT model pairs and sparse-feature mediation.

The installed package maps the repository's folders: `crosspatch.engine` (the pure library),
`crosspatch.saes` (dictionaries), `crosspatch.app` (service, queue, storage, CLI). The notebook names
below load lazily, so `import crosspatch` (and the CLI) does not import torch until one is used:

    from crosspatch import load_pair, load_prompts, find_divergences, crosspatch, summarize
    from crosspatch import load_dictionary, mediate
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_pair": "crosspatch.engine.pairs",
    "load_prompts": "crosspatch.engine.prompts",
    "find_divergences": "crosspatch.engine.divergence",
    "crosspatch": "crosspatch.engine.crosspatch",
    "summarize": "crosspatch.engine.stats",
    "mediate": "crosspatch.engine.mediation",
    "load_dictionary": "crosspatch.saes.load",
}
__all__ = [
    "crosspatch",
    "find_divergences",
    "load_dictionary",
    "load_pair",
    "load_prompts",
    "mediate",
    "summarize",
]

if TYPE_CHECKING:
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.mediation import mediate
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.prompts import load_prompts
    from crosspatch.engine.stats import summarize
    from crosspatch.saes.load import load_dictionary


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'crosspatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
