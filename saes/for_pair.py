"""Train a dictionary for one PT/IT pair end to end: token source, activation cache, training, gate.

The token source follows the method: each prompt followed by greedy PT continuations (EOS disabled), so
the dictionary sees the states the first-divergence events come from. Dictionaries never see evaluation
prompts (method section 5.1): by default (`training_prompts="mediation_fit"`) the prompts whose events
mediation will test (the test side of `engine.mediation.split_events` with the same fit fraction and seed)
are dropped before caching; `"all"` says the prompts are a separate corpus. The kept prompt ids and the
split are recorded in the cache manifest's source, hence in the dictionary's metadata, and mediation
refuses test events among them (`engine.guards`). Used by the pipeline job and the demo; the pieces
(`saes.cache`, `saes.train`) stay usable on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from crosspatch.engine.divergence import DivergenceEvent, eos_ids, find_divergences, left_pad, real_token_mask
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.mediation import split_events
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord
from crosspatch.saes.cache import TokenSource, build_cache
from crosspatch.saes.load import Dictionary, load_dictionary
from crosspatch.saes.quality import GateConfig
from crosspatch.saes.train import make_config, train_dictionary

ROLE_MODELS = {"it": ("it",), "pt": ("pt",), "paired": ("pt", "it")}
TRAINING_PROMPTS = ("mediation_fit", "all")


def mediation_training_prompts(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    events: Sequence[DivergenceEvent] | None = None,
    *,
    fit_fraction: float = 0.27,
    split_seed: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> tuple[list[PromptRecord], dict[str, Any]]:
    """The prompts a dictionary may train on: all but those whose events mediation tests, and the split.

    `events` are the prompts' first-divergence events (computed with `max_new_tokens` if not given); the
    test side is `engine.mediation.split_events(events, fit_fraction, split_seed)`, exactly what a mediation
    run with the same fit fraction and seed tests. Prompts without a scored event are never tested and stay.
    """
    if events is None:
        events = find_divergences(pair, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    fit, test = split_events(events, fit_fraction, split_seed)
    test_ids = {e.prompt_id for e in test}
    keep = [p for p in prompts if p.id not in test_ids]
    fit_ids = {e.prompt_id for e in fit}
    split = {
        "kind": "mediation_fit",
        "fit_fraction": fit_fraction,
        "split_seed": split_seed,
        "max_new_tokens": max_new_tokens,
        "n_prompts": len(prompts),
        "n_fit": len(fit_ids),
        "n_without_event": sum(p.id not in fit_ids for p in keep),
        "excluded_test_prompt_ids": sorted(test_ids),
    }
    return keep, split


@torch.no_grad()
def greedy_continuations(
    pair: ModelPair, prompts: Sequence[PromptRecord], n_tokens: int = 64, batch_size: int = 16
) -> list[list[int]]:
    """Prompt ids + `n_tokens` PT-greedy tokens per prompt (real-token mask; EOS suppressed)."""
    model = pair.pt
    neg = torch.where(real_token_mask(model, pair.tokenizer), 0.0, float("-inf")).to(model.device)
    neg[eos_ids(model, pair.tokenizer)] = float("-inf")
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [
            pair.tokenizer.encode(p.text, add_special_tokens=True)
            for p in prompts[start : start + batch_size]
        ]
        ids, mask = left_pad(seqs, pad, model.device)
        generated = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad,
            suppress_tokens=torch.nonzero(neg.isinf()).flatten().tolist(),
        )  # [batch, seq + n_tokens]
        for row, seq in enumerate(seqs):
            out.append(seq + generated[row, ids.shape[1] :].tolist())
    return out


def train_for_pair(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    out_dir: str | Path,
    *,
    architecture: str = "topk",
    role: str = "it",
    layer: int | None = None,
    width: int | None = None,
    k: float | None = 8,
    training_tokens: int | None = None,
    continuation_tokens: int = 64,
    batch_size: int = 256,
    lr: float = 3e-4,
    seed: int = 0,
    progress: Callable[[Any], None] | None = None,
    training_prompts: str = "mediation_fit",
    events: Sequence[DivergenceEvent] | None = None,
    fit_fraction: float = 0.27,
    split_seed: int = 0,
    max_new_tokens: int = 128,
    gate: GateConfig | None = None,
    balance_branches: bool = False,
) -> Dictionary:
    """Cache `role`'s MLP activations at `layer` (default: the last) and train an `architecture` dictionary.

    `training_prompts="mediation_fit"` trains only on prompts outside the mediation test split of
    `events` (see `mediation_training_prompts`); `"all"` uses every prompt (a separate corpus). Crosscoders
    default to the method's shape scaled to the model (width 32 x d_model, k = 64 x d_model / 4096, at least
    1); `balance_branches` trains them on per-branch normalised activations (see `CrosscoderTrain`). `gate` is
    the quality gate applied after training (default: the method's, 10,000 held-out tokens minimum).
    Resumes: an existing finished dictionary in `out_dir/dictionary` is loaded instead of retrained, and
    the cache and training resume from their own checkpoints.
    """
    if training_prompts not in TRAINING_PROMPTS:
        raise CrosspatchError(
            f"unknown training_prompts {training_prompts!r}; valid: {', '.join(TRAINING_PROMPTS)}"
        )
    out = Path(out_dir)
    final = out / "dictionary"
    if (final / "cfg.json").is_file():
        return load_dictionary(final)
    if training_prompts == "mediation_fit":
        prompts, split = mediation_training_prompts(
            pair,
            prompts,
            events,
            fit_fraction=fit_fraction,
            split_seed=split_seed,
            max_new_tokens=max_new_tokens,
        )
    else:
        split = {"kind": "all", "n_prompts": len(prompts), "note": "the prompts are a separate corpus"}
    layer = pair.n_layers - 1 if layer is None else layer
    crosscoder = architecture.endswith("crosscoder")
    d_model = pair.it_adapter.d_model
    width = width or (32 if crosscoder else 8) * d_model
    if crosscoder and k is None:
        k = max(1.0, 64 * d_model / 4096)  # method 5.1: k=64 at d_model 4096
    roles = ROLE_MODELS["paired" if crosscoder else role]
    models = {r: pair.it if r == "it" else pair.pt for r in roles}
    hooks = ("mlp_in", "mlp_out") if "transcoder" in architecture else ("mlp_out",)
    sequences = greedy_continuations(pair, prompts, continuation_tokens)
    source = TokenSource(kind="ids", ids=sequences, prompt_ids=[p.id for p in prompts], split=split)
    cache = build_cache(
        out / "cache", models, source, layers=[layer], hook_points=hooks, tokenizer=pair.tokenizer
    )
    n_rows = int(cache.manifest["n_tokens"])
    batch_size = min(batch_size, max(8, n_rows // 8))
    options: dict[str, Any] = dict(
        layer=layer,
        width=width,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        dead_feature_window=min(1000, max(50, n_rows // batch_size)),
    )
    options["training_tokens"] = training_tokens or 30 * n_rows
    if k is not None and (architecture in ("topk", "batchtopk") or architecture.startswith("batchtopk_")):
        options["k"] = k
    if not crosscoder:
        options["model_role"] = roles[0]
    else:
        # method 5.1: the inference threshold is the EMA (beta 0.999) of the BatchTopK cutoff from step 6,000
        # of 24,000; scaled to this run: from a quarter of the steps, averaging over about 1/20 of them
        steps = -(-options["training_tokens"] // batch_size)
        options["threshold_start_step"] = steps // 4
        options["threshold_beta"] = min(0.999, 1.0 - 1.0 / max(2, steps // 20))
        options["balance_branches"] = balance_branches
    cfg = make_config(architecture, **options)
    return train_dictionary(cfg, cache, final, models=models, progress=progress, gate=gate)
