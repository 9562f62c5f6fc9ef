"""Train a dictionary for one PT/IT pair end to end: token source, activation cache, training, gate.

The token source follows the method: each prompt followed by greedy PT continuations (EOS disabled), so
the dictionary sees the states the first-divergence events come from. Used by the pipeline job and the
demo; the pieces (`saes.cache`, `saes.train`) stay usable on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from crosspatch.engine.divergence import eos_ids, left_pad, real_token_mask
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord
from crosspatch.saes.cache import build_cache
from crosspatch.saes.load import Dictionary, load_dictionary
from crosspatch.saes.train import make_config, train_dictionary

ROLE_MODELS = {"it": ("it",), "pt": ("pt",), "paired": ("pt", "it")}


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
) -> Dictionary:
    """Cache `role`'s MLP activations at `layer` (default: the last) and train an `architecture` dictionary.

    Resumes: an existing finished dictionary in `out_dir/dictionary` is loaded instead of retrained, and
    the cache and training resume from their own checkpoints.
    """
    out = Path(out_dir)
    final = out / "dictionary"
    if (final / "cfg.json").is_file():
        return load_dictionary(final)
    layer = pair.n_layers - 1 if layer is None else layer
    width = width or 8 * pair.it_adapter.d_model
    crosscoder = architecture.endswith("crosscoder")
    roles = ROLE_MODELS["paired" if crosscoder else role]
    models = {r: pair.it if r == "it" else pair.pt for r in roles}
    hooks = ("mlp_in", "mlp_out") if "transcoder" in architecture else ("mlp_out",)
    sequences = greedy_continuations(pair, prompts, continuation_tokens)
    cache = build_cache(
        out / "cache", models, sequences, layers=[layer], hook_points=hooks, tokenizer=pair.tokenizer
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
    cfg = make_config(architecture, **options)
    return train_dictionary(cfg, cache, final, models=models, progress=progress)
