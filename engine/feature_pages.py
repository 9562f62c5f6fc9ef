"""What a feature page needs, stored at mediation time: decoded top-activating events and logit-lens tokens.

The page itself (`app.services.features.feature_page`) reads DuckDB only, with no model or tokenizer at
hand, so the worker decodes here, once, while the pair is loaded:

- `feature_examples_table`: per latent, its top `n_examples` events by activation in (IT up, IT late),
  each with the scored token (the last input token, whose MLP output mediation reads) decoded and the
  text before it (prompt + shared prefix, the last `context_chars` characters) and after it (t_IT).
- `decoder_tokens_table`: per latent, the top / bottom `n_tokens` tokens of its decoder row read through
  the IT model's unembedding alone, `W_dec[f] @ W_U.T` (no final norm: neither its normalisation nor its
  gain, the usual logit lens of a direction, as Neuronpedia's "logit weights"), over real tokens only; and,
  for multi-branch dictionaries (crosscoders), the PT branch's share of the decoder norm
  `|W_dec[f, pt]| / (|W_dec[f, pt]| + |W_dec[f, it]|)` (0 = an IT-only latent).

Which latents: every latent that fired on an event, up to `max_latents`; beyond that the ones with the
largest fit-split attribution |score| (the mediation ranking), so the causally ranked features always
have a page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from crosspatch.engine.divergence import DivergenceEvent, real_token_mask
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import FEATURE_DECODER_TOKENS_SCHEMA, FEATURE_EXAMPLES_SCHEMA

N_EXAMPLES = 10
N_TOKENS = 10
MAX_LATENTS = 4096
CONTEXT_CHARS = 240


def page_latents(
    feature_acts: pa.Table,
    scores: Mapping[tuple[str, int], float] | None = None,
    max_latents: int = MAX_LATENTS,
) -> list[tuple[str, int]]:
    """(dictionary id, latent) pairs that get a page: every fired latent, or the top |score| `max_latents`."""
    keys = sorted(
        set(zip(feature_acts["dictionary_id"].to_pylist(), feature_acts["latent"].to_pylist(), strict=True))
    )
    if len(keys) > max_latents:
        scores = scores or {}
        keys = sorted(keys, key=lambda k: (-abs(scores.get(k, 0.0)), k))[:max_latents]
    return keys


def feature_examples_table(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    feature_acts: pa.Table,
    latents: Sequence[tuple[str, int]],
    n_examples: int = N_EXAMPLES,
    context_chars: int = CONTEXT_CHARS,
) -> pa.Table:
    """FEATURE_EXAMPLES_SCHEMA rows: each latent's top `n_examples` events by IT-up activation, decoded."""
    if n_examples < 1 or context_chars < 0:
        raise ValueError(f"n_examples must be >= 1 and context_chars >= 0, got {n_examples}, {context_chars}")
    wanted = set(latents)
    by_prompt = {e.prompt_id: e for e in events if e.diverged}
    acts = feature_acts.filter(pc.greater(feature_acts["act_itup"], 0.0))
    rows = acts.to_pylist()
    grouped: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        key = (r["dictionary_id"], r["latent"])
        if key in wanted and r["prompt_id"] in by_prompt:
            grouped.setdefault(key, []).append(r)
    decoded: dict[str, tuple[str, str, str]] = {}
    tok = pair.tokenizer

    def decode(e: DivergenceEvent) -> tuple[str, str, str]:
        if e.prompt_id not in decoded:
            ids = list(e.input_ids)
            before = tok.decode(ids[:-1], skip_special_tokens=False)
            before = before[-context_chars:] if context_chars else ""
            decoded[e.prompt_id] = (before, tok.decode(ids[-1:]), tok.decode([e.t_it]))
        return decoded[e.prompt_id]

    out: list[dict] = []
    for key in sorted(grouped):
        top = sorted(grouped[key], key=lambda r: (-r["act_itup"], r["prompt_id"]))[:n_examples]
        for rank, r in enumerate(top):
            before, token, after = decode(by_prompt[r["prompt_id"]])
            out.append(
                dict(
                    family=pair.family,
                    pair_id=pair.pair_id,
                    dictionary_id=key[0],
                    layer=r["layer"],
                    latent=key[1],
                    rank=rank,
                    prompt_id=r["prompt_id"],
                    split=r["split"],
                    activation=r["act_itup"],
                    activation_ptup=r["act_ptup"],
                    context_before=before,
                    token=token,
                    context_after=after,
                )
            )
    return pa.Table.from_pylist(out, schema=FEATURE_EXAMPLES_SCHEMA)


def pt_decoder_share(w_dec: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """`[n_latents]` |W_dec[f, pt]| / (|W_dec[f, pt]| + |W_dec[f, it]|), or None without both branches."""
    if "pt" not in w_dec or "it" not in w_dec:
        return None
    pt, it = w_dec["pt"].float().norm(dim=-1), w_dec["it"].float().norm(dim=-1)  # [n_latents]
    return pt / (pt + it).clamp_min(1e-12)


@torch.no_grad()
def decoder_tokens_table(
    pair: ModelPair,
    dictionary_id: str,
    layer: int,
    w_dec: Mapping[str, torch.Tensor],
    latents: Sequence[int],
    branch: str = "it",
    architecture: str | None = None,
    n_tokens: int = N_TOKENS,
) -> pa.Table:
    """FEATURE_DECODER_TOKENS_SCHEMA rows: top / bottom `n_tokens` of `W_dec[f, branch] @ W_U(IT).T`."""
    if branch not in w_dec:
        raise ValueError(f"dictionary {dictionary_id!r} has no branch {branch!r}; valid: {', '.join(w_dec)}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if not latents:
        return FEATURE_DECODER_TOKENS_SCHEMA.empty_table()
    unembed = pair.it.get_output_embeddings().weight  # [vocab, d_model]
    idx = torch.tensor(list(latents), dtype=torch.long)
    rows_w = w_dec[branch][idx.to(w_dec[branch].device)].to(unembed.device, torch.float32)  # [n, d_model]
    logits = rows_w @ unembed.float().T  # [n, vocab]
    allowed = real_token_mask(pair.it, pair.tokenizer).to(logits.device)  # [vocab]
    n = min(n_tokens, int(allowed.sum()))
    top = logits.masked_fill(~allowed, float("-inf")).topk(n, dim=-1)  # [n_latents, n]
    bottom = logits.masked_fill(~allowed, float("inf")).topk(n, dim=-1, largest=False)
    share = pt_decoder_share(w_dec)
    share_np = None if share is None else share[idx.to(share.device)].cpu().numpy()
    out: list[dict] = []
    for direction, res in (("top", top), ("bottom", bottom)):
        ids, vals = res.indices.cpu().numpy(), res.values.cpu().numpy()
        for i, latent in enumerate(latents):
            for rank in range(n):
                token_id = int(ids[i, rank])
                out.append(
                    dict(
                        family=pair.family,
                        pair_id=pair.pair_id,
                        dictionary_id=dictionary_id,
                        layer=layer,
                        latent=int(latent),
                        architecture=architecture,
                        branch=branch,
                        direction=direction,
                        rank=rank,
                        token_id=token_id,
                        token=pair.tokenizer.decode([token_id]),
                        value=float(vals[i, rank]),
                        pt_decoder_share=None if share_np is None else float(share_np[i]),
                    )
                )
    return pa.Table.from_pylist(out, schema=FEATURE_DECODER_TOKENS_SCHEMA)


def scores_by_key(keys: Sequence[tuple[str, int]], score: np.ndarray) -> dict[tuple[str, int], float]:
    """The mediation ranking's keys and scores as a dict, for `page_latents`."""
    return {k: float(s) for k, s in zip(keys, score, strict=True)}
