"""The admin's allow-list of PT/IT pairs."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from crosspatch.app.config import Settings
from crosspatch.app.errors import Conflict, Invalid
from crosspatch.app.services.paths import HUB_ID, is_local_ref, resolve_under
from crosspatch.app.store.models import Pair

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _local_info(path: Path, field: str) -> tuple[int | None, int]:
    """(n_layers from config.json, bytes of weight files) of a local HF model directory."""
    n_layers = None
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            text = cfg.get("text_config") or cfg
            n_layers = text.get("num_hidden_layers") or text.get("n_layer")
        except (OSError, ValueError, AttributeError) as e:
            raise Invalid(field, f"cannot read {cfg_file}: {e}") from e
        if n_layers is not None and (not isinstance(n_layers, int) or n_layers < 1):
            raise Invalid(field, f"{cfg_file}: num_hidden_layers must be a positive integer")
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    return n_layers, size


def _model_ref(raw: str, settings: Settings, field: str) -> tuple[str, int | None, int]:
    """A local path (checked under the model roots) or a hub id; with n_layers and size if local."""
    if not is_local_ref(raw):  # a hub id by its syntax, whatever this process's working directory holds
        if not HUB_ID.match(raw):
            raise Invalid(
                field, "a hub id looks like 'org/name'; local paths are absolute and under the model roots"
            )
        return raw, None, 0
    path = resolve_under(raw, settings.model_roots, field)
    if not (path / "config.json").is_file():
        raise Invalid(field, "a local model directory needs a config.json")
    n_layers, size = _local_info(path, field)
    return str(path), n_layers, size


def add_pair(
    session: Session,
    settings: Settings,
    *,
    pair_id: str,
    family: str,
    pt: str,
    it: str,
    n_layers: int | None = None,
    default_boundary: int | None = None,
    pt_revision: str | None = None,
    it_revision: str | None = None,
) -> Pair:
    """Allow-list a pair; local paths must lie under the model roots. 409 if `pair_id` exists."""
    if session.get(Pair, pair_id) is not None:
        raise Conflict(f"pair {pair_id!r} already exists")
    pt_ref, pt_layers, pt_size = _model_ref(pt, settings, "pt")
    it_ref, it_layers, it_size = _model_ref(it, settings, "it")
    if pt_layers and it_layers and pt_layers != it_layers:
        raise Invalid("it", f"PT has {pt_layers} layers but IT has {it_layers}; a pair needs equal depth")
    n = n_layers or pt_layers or it_layers
    if not n:
        raise Invalid("n_layers", "give n_layers for models that are not local directories")
    if default_boundary is None:
        default_boundary = round(0.6 * n)
    if not 0 <= default_boundary <= n:
        raise Invalid("default_boundary", f"must lie in 0..{n}")
    # Two models resident plus activations: a conservative estimate from the weight files.
    memory = int((pt_size + it_size) * 1.3)
    pair = Pair(
        pair_id=pair_id,
        family=family,
        pt=pt_ref,
        it=it_ref,
        n_layers=n,
        default_boundary=default_boundary,
        pt_revision=pt_revision,
        it_revision=it_revision,
        estimated_memory_bytes=memory,
    )
    session.add(pair)
    session.flush()
    return pair


def list_pairs(session: Session) -> list[Pair]:
    return list(session.scalars(select(Pair).order_by(Pair.pair_id)))
