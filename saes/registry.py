"""A simple on-disk project registry: every dictionary directory under a root, indexed by id.

The job store's SQL table is the app's (app/store); this index serves the library and the CLI. It scans
`root/**/crosspatch_meta.json` (so a dictionary trained with `out_dir` under the root is registered by
being there) and keeps `index.json` as a cache of the rows, rewritten atomically on each scan.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crosspatch.saes.errors import DictionaryLoadError
from crosspatch.saes.load import META_FILENAME, Dictionary, load_dictionary

ROW_FIELDS = (
    "id", "model_role", "layer", "hook_point", "kind", "architecture", "width", "k", "training_tokens",
    "path", "created_at", "created_by",
)  # fmt: skip


def registry_row(meta: dict[str, Any]) -> dict[str, Any]:
    """The registry/table row of a dictionary's metadata (what app/store persists)."""
    row = {f: meta.get(f) for f in ROW_FIELDS}
    gate = meta.get("gate") or {}
    row["gate_status"] = gate.get("status", "not_evaluated")
    row["gate_checks"] = [
        {k: c.get(k) for k in ("name", "value", "threshold", "passed", "status")}
        for c in gate.get("checks") or []
        if isinstance(c, dict)
    ]  # every check by name (method section 5.1); causal ones "pending" until mediation fills them
    row["gate_overrides"] = list(gate.get("overrides") or [])
    source = (meta.get("cache") or {}).get("source") or {}
    ids = source.get("prompt_ids")
    row["training_prompts"] = {
        "n": None if ids is None else len(ids),
        "split": source.get("split"),
    }  # which prompts trained it: mediation refuses test events among them
    row["metrics"] = meta.get("metrics", {})
    row["pair"] = {r: (m or {}).get("path") for r, m in (meta.get("cache", {}).get("models") or {}).items()}
    return row


class DictionaryRegistry:
    """Index of dictionaries under `root`: `rows()`, `get(id)`, `load(id)`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def scan(self) -> list[dict[str, Any]]:
        """Re-read every crosspatch_meta.json under the root and rewrite index.json."""
        rows = []
        if self.root.exists():
            for meta_path in sorted(self.root.rglob(META_FILENAME)):
                try:
                    meta = json.loads(meta_path.read_text())
                except json.JSONDecodeError:
                    continue  # a corrupt entry is reported by `load`, not by listing
                meta["path"] = str(meta_path.parent.resolve())
                if not meta.get("id"):
                    meta["id"] = meta_path.parent.name
                rows.append(registry_row(meta))
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / "index.json.tmp"
            tmp.write_text(json.dumps(rows, indent=1, default=str))
            os.replace(tmp, self.root / "index.json")
        return rows

    def rows(self, **filters: str | int | float | bool | None) -> list[dict[str, Any]]:
        """Rows matching `filters` (e.g. layer=4, kind="crosscoder", gate_status="passed")."""
        return [r for r in self.scan() if all(r.get(k) == v for k, v in filters.items())]

    def get(self, ref: str) -> dict[str, Any]:
        """The row of dictionary `ref` (an id, or a unique id prefix)."""
        rows = self.scan()
        exact = [r for r in rows if r["id"] == ref]
        hits = exact or [r for r in rows if str(r["id"]).startswith(ref)]
        if len(hits) != 1:
            known = ", ".join(str(r["id"]) for r in rows[:10]) or "none"
            what = "no dictionary" if not hits else f"{len(hits)} dictionaries"
            raise DictionaryLoadError(f"{what} matching {ref!r} in registry {self.root}; known: {known}")
        return hits[0]

    def load(self, ref: str, device: str = "cpu") -> Dictionary:
        return load_dictionary(self.get(ref)["path"], device=device)
