"""Write organisms to disk: PT/IT in Hugging Face format, the shared tokenizer, prompts and expected.json.

Layout of one organism directory (the same for constructed and shipped trained organisms):

    <dir>/pt/               config.json, model.safetensors, tokenizer files
    <dir>/it/               the same for IT
    <dir>/expected.json     metadata, and for constructed organisms the 2x2 bounds the construction implies
    <dir>/prompts.jsonl     the organism's prompt set (method format)
    <dir>/prompts_heldout.jsonl  a disjoint held-out set (fit/test splits, e.g. mediation)
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.organisms import constructed as cons
from crosspatch.engine.organisms.tokenizer import ANSWER_WORDS, build_tokenizer, vocabulary

BUILDER_VERSION = 2
N_PROMPTS = 48
N_HELDOUT = 24
MAX_POSITION = 4  # constructed prompts diverge at generated positions 0..MAX_POSITION
TOL_REL, TOL_ABS = 0.1, 0.5  # noise band around a nominal value that noise weights can move
TOL_EXACT = 1e-4  # quantities the construction fixes exactly (identical computations)

# Quantities fixed exactly by each construction (the late stacks, or the upstreams, compute the same thing).
EXACT: dict[str, tuple[str, ...]] = {
    "upstream_dependent": ("pt_late_effect",),
    "mediated": ("pt_late_effect",),
    "first_late_block": ("pt_late_effect",),
    "two_descendants": ("pt_late_effect",),
    "self_contained": ("interaction",),
    "upstream_only": ("pt_late_effect", "it_late_effect", "interaction"),
}
# `paper_sized` first divergences fall at generated position 0 or 3..8 (most at >= 3).
PAPER_POSITIONS: tuple[int, ...] = (0, 3, 4, 5, 6, 7, 8)
# Kinds whose prompt set meets its classes in equal shares (`mediated`: each class has its planted latent).
CLASS_BALANCED: tuple[str, ...] = ("paper_sized", "mediated")
# Kinds whose prompts score a new classed word where the walks allow (`mediated`: every scored word is one more
# (class, word group) sample, so a fit split meets many background features).
DISTINCT_SCORED: tuple[str, ...] = ("mediated",)
INTERACTION_CI: dict[str, str] = {
    "upstream_dependent": "excludes_zero",
    "mediated": "excludes_zero",
    "first_late_block": "excludes_zero",
    "self_contained": "covers_zero",
    "upstream_only": "covers_zero",
    "paper_sized": "excludes_zero",
    "lineage": "excludes_zero",
    "two_descendants": "excludes_zero",
}


def write_pair(
    pt: PreTrainedModel, it: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> None:
    """Save PT and IT (safetensors) with the tokenizer next to each, under `out_dir/pt` and `out_dir/it`."""
    for role, model in (("pt", pt), ("it", it)):
        model.save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


# ---- constructed organisms ---------------------------------------------------------------------------


def divergence_step(con: cons.Construction, last_word: int) -> tuple[int, int]:
    """(generated position, classed word) where IT first departs from PT's walk starting at `last_word`."""
    word, position = last_word, 0
    while word not in con.word_class:
        word, position = con.succ[word], position + 1
    return position, word


def _walk_starts(con: cons.Construction, words: list[int]) -> dict[tuple[int, int], list[int]]:
    """(generated position, class of the first classed word) -> the words whose walk starts there.

    Most kinds use every class at positions 0..MAX_POSITION (class key -1). `paper_sized` uses its strong
    classes only, at `PAPER_POSITIONS`, and `mediated` every class (one planted latent each), each with one
    combination per available (position, class), classes alternating.
    """
    balanced = con.kind in CLASS_BALANCED
    classes = con.strong_classes or tuple(range(cons.N_CLASSES))
    positions = PAPER_POSITIONS if con.kind == "paper_sized" else tuple(range(MAX_POSITION + 1))
    out: dict[tuple[int, int], list[int]] = {}
    for w in words:
        pos, classed = divergence_step(con, w)
        j = con.word_class[classed] if balanced else -1
        if pos in positions and (j in classes or not balanced):
            out.setdefault((pos, j), []).append(w)
    if balanced:  # keep positions where every class has a start
        full = {p for p, _ in out if all((p, j) in out for j in classes)}
        out = {k: v for k, v in out.items() if k[0] in full}
    return out


def constructed_prompts(con: cons.Construction, n: int, seed: int, id_prefix: str) -> list[dict[str, Any]]:
    """`n` word-sequence prompts whose walk meets a classed word within `MAX_POSITION` generated steps."""
    vocab = vocabulary()
    rng = random.Random(seed)
    words = sorted(con.succ)
    by_start = _walk_starts(con, words)
    starts = sorted(by_start)
    records = []
    scored: set[int] = set()  # `mediated`: classed words already scored (prefer new ones)
    for i in range(n):
        start = starts[i % len(starts)]  # cycle through positions (and classes) so every one is represented
        pos = start[0]
        candidates = by_start[start]
        if con.kind in DISTINCT_SCORED:
            candidates = [w for w in candidates if divergence_step(con, w)[1] not in scored] or candidates
        last = rng.choice(candidates)
        body = [rng.choice(words) for _ in range(rng.randint(3, 8))] + [last]
        _, classed = divergence_step(con, last)
        scored.add(classed)
        answer = ANSWER_WORDS[con.word_class[classed]]
        # PT's token at the divergent step is the successor of the classed word.
        records.append(
            {
                "id": f"{id_prefix}{i:03d}",
                "category": "immediate" if pos == 0 else "delayed",
                "prompt": " ".join(vocab[t] for t in body),
                "expected_answer": answer,
                "answer_aliases": [],
                "expected_position": pos,
                "expected_t_pt": vocab[con.succ[classed]],
                "expected_t_it": answer,
            }
        )
    return records


def _band(kind: str, quantity: str, nominal: float) -> dict[str, Any]:
    exact = quantity in EXACT.get(kind, ())
    tol = TOL_EXACT if exact else TOL_REL * abs(nominal) + TOL_ABS
    return {"nominal": nominal, "lo": nominal - tol, "hi": nominal + tol, "exact": exact}


def _support_nominal(con: cons.Construction, neurons: list[cons.Neuron] | None = None) -> dict[str, float]:
    """Nominal 2x2 averaged over the classes the prompt set's first divergences meet (equal shares); with word
    groups, over every classed word (each has its own group value)."""
    if con.word_group:
        per_word = [cons.nominal_cells(con, neurons=neurons, word=w) for w in sorted(con.word_class)]
    else:
        per_word = [
            cons.nominal_cells(con, word_class=j, neurons=neurons) for j in con.strong_classes or (0,)
        ]
    return {q: sum(c[q] for c in per_word) / len(per_word) for q in per_word[0]}


def constructed_expected(con: cons.Construction, name: str) -> dict[str, Any]:
    """expected.json of a constructed organism: nominal 2x2 (noise-free), bounds and mediator metadata."""
    nominal = _support_nominal(con)
    if not con.strong_classes:  # the construction is symmetric across classes
        first = cons.nominal_cells(con, word_class=0)
        for j in sorted(set(con.word_class.values()) - {0}):
            other = cons.nominal_cells(con, word_class=j)
            assert all(math.isclose(other[k], v, abs_tol=1e-9) for k, v in first.items())
    out: dict[str, Any] = {
        "name": name,
        "kind": "constructed",
        "construction": con.kind,
        "family": con.family,
        "seed": con.seed,
        "builder_version": BUILDER_VERSION,
        "n_layers": cons.N_LAYERS,
        "boundary": cons.BOUNDARY,
        "readout": "it",
        "metric": "Y = logit(t_IT) - logit(t_PT) at the divergent step",
        "every_prompt_diverges": True,
        "interaction_ci": INTERACTION_CI[con.kind],
        "cells": {q: _band(con.kind, q, v) for q, v in nominal.items()},
        "tolerance_rule": f"exact: +-{TOL_EXACT}; else +-({TOL_REL}*|nominal| + {TOL_ABS}) for noise weights",
    }
    if con.mediators:
        ablated = cons.nominal_cells(con, ablate_mediators=True)
        out["mediators"] = {
            "layer": con.mediators[0].layer,
            "site": "mlp_output",
            "neurons": [n.index for n in con.mediators],
            "answer_words": list(ANSWER_WORDS),
            "directions": [
                [n.down.get(i, 0.0) / _norm(n.down) for i in range(cons.D_MODEL)] for n in con.mediators
            ],
            "interaction_after_ablation": ablated["interaction"],
            "min_interaction_share_removed": 0.9,
        }
    if con.base_neurons:  # `mediated`: the shared background neurons, one per word group, in PT and IT
        out["background"] = {
            "layer": con.base_neurons[0].layer,
            "site": "mlp_output",
            "neurons": [n.index for n in con.base_neurons],
            "directions": [
                [n.down.get(i, 0.0) / _norm(n.down) for i in range(cons.D_MODEL)] for n in con.base_neurons
            ],
            "identity_start": con.identity_start,
        }
    if con.kind == "paper_sized":
        out["classes"] = {
            str(j): {
                "strong": j in con.strong_classes,
                "answer_word": ANSWER_WORDS[j],
                "cells": cons.nominal_cells(con, word_class=j),
                "boundary_margin": cons.nominal_boundary_margin(con, word_class=j),
            }
            for j in range(cons.N_CLASSES)
        }
        out["word_class"] = {vocabulary()[t]: j for t, j in sorted(con.word_class.items())}
        out["positions"] = list(PAPER_POSITIONS)
    if con.stages:
        out["stages"] = {
            stage: {
                "path": f"stages/{stage}",
                # the portable descendant is self-contained: its upstream is the base's (interaction exactly 0)
                "cells": {
                    q: _band("self_contained" if stage == cons.LINEAGE_PORTABLE else con.kind, q, v)
                    for q, v in _support_nominal(con, neurons).items()
                },
            }
            for stage, neurons in con.stages.items()
        }
    if con.kind == "lineage":
        out["stage_order"] = list(cons.LINEAGE_STAGES)
        out["portable_stage"] = cons.LINEAGE_PORTABLE
    if con.kind == "two_descendants":  # boundary-state closure of IT's hybrid with rank-1 directions (§5.6)
        second = con.stages[cons.TWO_SECOND]
        out["closure"] = {
            "second_descendant": f"stages/{cons.TWO_SECOND}",
            "own_rank1": cons.nominal_closure(con, con.it_neurons),
            "wrong_descendant_rank1": cons.nominal_closure(con, second),
        }
    return out


def _norm(coords: dict[int, float]) -> float:
    return math.sqrt(sum(v * v for v in coords.values()))


def build_constructed(kind: str, family: str, seed: int, out_dir: Path) -> Path:
    """Build one constructed organism into `out_dir` (created; must not exist)."""
    out_dir.mkdir(parents=True)
    con = cons.make_construction(kind, family, seed)
    pt, it = cons.build_models(con)
    tokenizer = build_tokenizer()
    write_pair(pt, it, tokenizer, out_dir)
    for stage, neurons in con.stages.items():  # lineage descendants of the same base (PT)
        _, model = cons.build_models(con, neurons)
        model.save_pretrained(out_dir / "stages" / stage)
        tokenizer.save_pretrained(out_dir / "stages" / stage)
    name = f"{family}_{kind}"
    write_jsonl(out_dir / "prompts.jsonl", constructed_prompts(con, N_PROMPTS, seed, f"{name}-"))
    write_jsonl(
        out_dir / "prompts_heldout.jsonl", constructed_prompts(con, N_HELDOUT, seed + 7919, f"{name}-h")
    )
    (out_dir / "expected.json").write_text(json.dumps(constructed_expected(con, name), indent=2) + "\n")
    return out_dir


# ---- cache -------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$CROSSPATCH_CACHE_DIR/organisms`, else `~/.cache/crosspatch/organisms`."""
    env = os.environ.get("CROSSPATCH_CACHE_DIR")
    return Path(env) / "organisms" if env else Path.home() / ".cache" / "crosspatch" / "organisms"


def build_atomic(final: Path, build: Callable[[Path], object]) -> Path:
    """Run `build(tmp_dir)` into a temp dir beside `final`, then rename; a concurrent winner is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp / "organism")
        try:
            os.rename(tmp / "organism", final)
        except OSError:
            if not (final / "expected.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
