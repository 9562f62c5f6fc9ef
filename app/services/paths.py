"""Paths from requests: only under configured roots, never through `..`."""

from __future__ import annotations

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
