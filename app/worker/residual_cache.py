"""A crosspatch chunk's residuals in the shared cache: what the 2x2 needs from the expensive phases.

Per chunk of a 2x2 job on a resident pair, an entry (kind `residuals`) holds the chunk's divergence events
(`events.json`, every field) and, per diverged event, the fused path's capture (`residuals.safetensors`):
the residual entering each boundary block at every position of prompt + shared prefix, and each model's
final residual at the scored step (`engine.divergence.EventCapture`). Its content key covers the pair's
weights and tokenizer fingerprints, the chunk's prompts (ids, texts, categories), the divergence settings,
the boundaries and the dtype. A later job with the same inputs whose owner may read the source job's
results (`app.services.cache`) loads them instead of decoding: only the two off-diagonal late stacks per
boundary (and the first batch's no-op check) run, and the cells are the same, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow as pa
from safetensors.torch import load_file, save_file

from crosspatch.app.services.cache import digest
from crosspatch.app.worker.context import JobContext
from crosspatch.app.worker.executor import ChunkTask
from crosspatch.app.worker.staging import ChunkHooks, chunk_cells, chunk_events
from crosspatch.engine.divergence import DivergenceEvent, EventCapture
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import events_table

KIND = "residuals"
EVENTS, TENSORS = "events.json", "residuals.safetensors"
_FIELDS = [f.name for f in fields(DivergenceEvent)]


def applies(ctx: JobContext, task: ChunkTask) -> bool:
    """Whether the chunk goes through the cache: a 2x2 chunk on first_diff events, the cache on."""
    cache = ctx.shared_cache
    return (
        cache is not None
        and cache.cap_bytes > 0
        and task.boundaries is not None
        and task.event == "first_diff"
    )


_FINGERPRINTS: dict[int, dict[str, str]] = {}  # id(pair) -> its hashes, dropped with the pair


def fingerprints(pair: ModelPair) -> dict[str, str]:
    """`pair.provenance()`, hashed once per loaded pair (the worker keeps its pair warm across jobs)."""
    if id(pair) not in _FINGERPRINTS:
        _FINGERPRINTS[id(pair)] = pair.provenance()
        weakref.finalize(pair, _FINGERPRINTS.pop, id(pair), None)
    return _FINGERPRINTS[id(pair)]


def material(ctx: JobContext, pair: ModelPair, task: ChunkTask) -> dict[str, Any]:
    """Everything the chunk's events and residuals depend on (the content key's input)."""
    return {
        "pair_id": pair.pair_id,
        "pair": fingerprints(pair),  # weights + tokenizer hashes: the pair's revision
        "prompts": digest([(p.id, p.text, p.category) for p in task.prompts]),
        "settings": {
            "dtype": ctx.dtype,
            "max_new_tokens": task.max_new_tokens,
            "batch_size": task.batch_size,
            "chat_template": task.chat_template,
            "event": task.event,
            "boundaries": list(task.boundaries or ()),
            "n_prompts": len(task.prompts),
        },
    }


def save(events: list[DivergenceEvent], out: Path) -> None:
    """Write the events and their captures under `out` (the events file last: its presence = complete)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, e in enumerate(events):
        if e.capture is None:
            continue
        for role in ("pt", "it"):
            tensors[f"{i}/{role}/final"] = e.capture.final[role].contiguous().clone()  # [d_model]
            for b, x in e.capture.inputs[role].items():
                tensors[f"{i}/{role}/{b}"] = x.contiguous().clone()  # [seq, d_model]
    save_file(tensors, str(out / TENSORS))
    rows = [{name: getattr(e, name) for name in _FIELDS} for e in events]
    tmp = out / f"{EVENTS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"boundaries": _boundaries(events), "events": rows}))
    os.replace(tmp, out / EVENTS)


def _boundaries(events: list[DivergenceEvent]) -> list[int]:
    return next((list(e.capture.boundaries) for e in events if e.capture is not None), [])


def load(out: Path) -> list[DivergenceEvent]:
    """The events saved under `out`, with their captures (the fused 2x2's inputs) restored."""
    data = json.loads((out / EVENTS).read_text())
    tensors = load_file(str(out / TENSORS))
    boundaries = tuple(data["boundaries"])
    events = []
    for i, row in enumerate(data["events"]):
        e = DivergenceEvent(**row)
        if f"{i}/pt/final" in tensors:
            e.capture = EventCapture(
                boundaries,
                {r: {b: tensors[f"{i}/{r}/{b}"] for b in boundaries} for r in ("pt", "it")},
                {r: tensors[f"{i}/{r}/final"] for r in ("pt", "it")},
            )
        events.append(e)
    return events


def run(ctx: JobContext, pair: ModelPair, task: ChunkTask, hooks: ChunkHooks) -> dict[str, pa.Table]:
    """The chunk's tables, its events and residuals reused from a readable entry, else computed and stored."""
    cache = ctx.shared_cache
    assert cache is not None
    out = ctx.checkpoint_dir / KIND / task.name
    shutil.rmtree(out, ignore_errors=True)  # a crashed attempt's files: never trusted

    def compute() -> dict[str, pa.Table]:
        if (out / EVENTS).is_file():  # a hit: the entry's files, hard-linked here
            events = load(out)
        else:
            events = chunk_events(pair, task, hooks)
            size = sum(e.capture.nbytes for e in events if e.capture is not None)
            if size <= cache.cap_bytes:  # larger than the whole cache: not stored (it would go at once)
                save(events, out)  # before the 2x2 consumes the captures
        tables = {"events": events_table(events, pair.family, pair.pair_id)}
        hooks.check_cancel()
        tables["cells"] = chunk_cells(pair, events, task, hooks)
        return tables

    try:
        return cache.reuse_or_compute(ctx, KIND, material(ctx, pair, task), out, compute, task.name)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the entry keeps its own links
