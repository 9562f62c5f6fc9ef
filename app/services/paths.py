"""Paths from requests: only under configured roots, never through `..`."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from crosspatch.app.errors import Invalid


def resolve_under(raw: str, roots: Sequence[Path], field: str, *, must_exist: bool = True) -> Path:
    """`raw` as an absolute path inside one of `roots` (symlinks resolved); else a 422 on `field`."""
    if not roots:
        raise Invalid(field, "this server has no configured roots for local paths")
    if "\x00" in raw:
        raise Invalid(field, "path must not contain a NUL character")
    if ".." in PurePosixPath(raw).parts or ".." in Path(raw).parts:
        raise Invalid(field, "path must not contain '..'")
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    allowed = ", ".join(str(r) for r in resolved_roots)
    try:
        candidate = Path(raw).expanduser()
        options = [candidate] if candidate.is_absolute() else [r / candidate for r in resolved_roots]
        for path in options:
            real = path.resolve()
            if any(real == r or real.is_relative_to(r) for r in resolved_roots):
                if must_exist and not real.exists():
                    continue
                return real
        outside = must_exist and any(p.resolve().exists() for p in options)
    except (OSError, RuntimeError) as e:  # name too long, symlink loop, unknown ~user
        raise Invalid(field, f"not a usable path: {getattr(e, 'strerror', None) or e}") from e
    if outside:
        raise Invalid(field, f"path is outside the allowed roots ({allowed})")
    raise Invalid(field, f"no such path under the allowed roots ({allowed})")


# A Hugging Face hub id: `org/name`, each part starting with a letter or digit (no `..`, no slashes more).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_local_ref(raw: str) -> bool:
    """A model reference names a local path only when it says so (`/...`, `./...`, `~...`); anything else
    is a hub id, judged by its own syntax and never looked up on disk."""
    return raw.startswith(("/", ".", "~"))


def model_ref_to_open(raw: str, roots: Sequence[Path], field: str) -> str:
    """What to hand the model loader, checked by the process that opens it, at the time it opens it.

    A local path: its real path (symlinks resolved) inside `roots`. A hub id: valid syntax, and naming
    nothing in this process's working directory (a loader would read such a directory instead of the hub).
    """
    if is_local_ref(raw):
        return str(resolve_under(raw, roots, field))
    if not HUB_ID.match(raw):
        raise Invalid(
            field, f"{raw!r} is neither a hub id ('org/name') nor a local path under the model roots"
        )
    if os.path.lexists(raw):
        raise Invalid(
            field,
            f"hub id {raw!r} names a path in this process's working directory ({os.getcwd()}); refusing to "
            "load a local directory by a hub id (register local models by their absolute path)",
        )
    return raw
