"""Staged pair execution (one model resident) equals lockstep, per family and on an organism."""

from __future__ import annotations

import gc
import weakref

import pyarrow.compute as pc
import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.noop import noop_report
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.organisms.tiny import FAMILIES, save_tiny_pair
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.results import CELL_COLUMNS
from crosspatch.engine.staged import (
    StagedPair,
    StateStore,
    load_staged_pair,
    staged_divergences,
)

EVENT_FIELDS = (
    "prompt_id",
    "diverged",
    "reason",
    "position",
    "t_pt",
    "t_it",
    "prefix_ids",
    "near_tie",
    "token_check",
)


def _same_events(lockstep, staged) -> None:
    assert [[getattr(e, f) for f in EVENT_FIELDS] for e in staged] == [
        [getattr(e, f) for f in EVENT_FIELDS] for e in lockstep
    ]
    for a, b in zip(lockstep, staged, strict=True):
        if a.diverged:
            assert b.gap_pt == pytest.approx(a.gap_pt, abs=1e-5) and b.gap_it == pytest.approx(
                a.gap_it, abs=1e-5
            )


def _same_cells(lockstep, staged) -> float:
    """Max |diff| over the four cells; the keys and effects must line up row for row."""
    assert staged.num_rows == lockstep.num_rows > 0
    for col in ("prompt_id", "boundary", "readout", "headline_boundary", "t_pt", "t_it", "position"):
        assert staged.column(col).to_pylist() == lockstep.column(col).to_pylist()
    diffs = [pc.max(pc.abs(pc.subtract(staged.column(c), lockstep.column(c)))).as_py() for c in CELL_COLUMNS]
    return max(diffs)


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_equals_lockstep_per_family(family: str) -> None:
    """One small batch per family: same events (positions, tokens, reasons, prefixes, near-tie gaps) and cells."""
    pair = tiny_pair(family, it_scale=0.05, seed=3)
    prompts = random_prompts(6, seed=4)
    lock_events = find_divergences(pair, prompts, max_new_tokens=6, batch_size=6)
    staged = StagedPair.from_models(pair.pt, pair.it, pair.tokenizer, family=family, pair_id=pair.pair_id)
    events = staged_divergences(staged, prompts, max_new_tokens=6, batch_size=6)
    _same_events(lock_events, events)
    assert sum(e.diverged for e in events) >= 3
    boundaries = [1, 3]
    lock = crosspatch(pair, lock_events, boundary=boundaries, readouts=("it", "pt", "own"), batch_size=6)
    cells = crosspatch(staged, events, boundary=boundaries, readouts=("it", "pt", "own"), batch_size=6)
    assert _same_cells(lock, cells) <= 1e-5
    assert staged.loads == ["pt", "it", "pt", "it"]  # divergence PT, IT; 2x2 IT (kept), PT, IT
    assert noop_report(cells)["passed"] and set(noop_report(cells)["max_abs_diff"]) == {
        "pt_diagonal_vs_hf",
        "pt_self_patch",
        "it_diagonal_vs_hf",
        "it_self_patch",
    }


def test_staged_organism_from_disk_frees_models_and_spills(tmp_path) -> None:
    """The upstream-dependent organism from disk: staged == lockstep, a model really leaves, states spill to files."""
    root = organism_path("llama_upstream_dependent")
    prompts = load_prompts(root / "prompts.jsonl")[:8]
    pair = load_pair(root / "pt", root / "it", pair_id="organism")
    lock_events = find_divergences(pair, prompts, max_new_tokens=4, batch_size=8)
    lock = crosspatch(pair, lock_events, batch_size=8)
    del pair
    staged = load_staged_pair(root / "pt", root / "it", pair_id="organism")
    events = staged_divergences(staged, prompts, max_new_tokens=4, batch_size=8)
    _same_events(lock_events, events)
    gone = weakref.ref(staged.model("it"))
    with StateStore(max_bytes=0, spill_dir=tmp_path / "spill") as store:  # every stored state memory-mapped
        cells = crosspatch(staged, events, batch_size=8, store=store)
        assert store.spilled > 0 and store.in_memory == 0
    assert _same_cells(lock, cells) <= 1e-5
    assert staged.resident() == ["it"]
    staged.use("pt")  # loading PT unloads IT: no reference is left
    gc.collect()
    assert gone() is None and staged.resident() == ["pt"]
    with pytest.raises(CrosspatchError, match="IT is not resident"):
        _ = staged.it


def test_staged_refuses_other_event_kinds() -> None:
    pair = tiny_pair("llama")
    staged = StagedPair.from_models(pair.pt, pair.it, pair.tokenizer)
    with pytest.raises(ValueError, match="only first_diff"):
        staged_divergences(staged, random_prompts(2), event="first_nonformat_diff")


def test_saved_tiny_pair_staged(tmp_path) -> None:
    """A saved tiny pair loads staged with its shapes from config.json and no weights until used."""
    pt, it = save_tiny_pair(tmp_path)
    staged = load_staged_pair(pt, it)
    assert staged.resident() == [] and staged.n_layers == 5 and staged.family == "llama"
    assert torch.is_tensor(staged.use("pt").unembed.weight)


def test_offloaded_blocks_equal_one_device(tmp_path) -> None:
    """A device map that offloads blocks to disk (accelerate) gives the single-device events and cells."""
    pt, it = save_tiny_pair(tmp_path, "qwen3")
    prompts = random_prompts(4, seed=5)
    plain = load_pair(pt, it, pair_id="p")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(5)}
    shard = load_pair(pt, it, pair_id="p", device=device_map, offload_folder=tmp_path / "offload")
    assert shard.pt.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    assert {d.type for d in shard.pt_adapter.block_devices} == {"cpu"}  # accelerate's execution device
    events = find_divergences(plain, prompts, max_new_tokens=5, batch_size=4)
    _same_events(events, find_divergences(shard, prompts, max_new_tokens=5, batch_size=4))
    lock = crosspatch(plain, events, boundary=[2, 3], batch_size=4)
    assert _same_cells(lock, crosspatch(shard, events, boundary=[2, 3], batch_size=4)) == 0.0
