"""Token preflight (method §1.1): events whose tokens differ between the tokenizers or readouts are not scored."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pyarrow.compute as pc
import torch
from helpers import random_prompts, tiny_pair, word_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import DIVERGED, find_divergences
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.preflight import TOKEN_MISMATCH
from crosspatch.engine.report import format_event_counts
from crosspatch.engine.results import CELL_COLUMNS, events_table

NEW = 512  # id of the added token


def _base():
    pair = tiny_pair("llama", it_scale=0.02, seed=3)
    prompts = random_prompts(32, seed=5)
    return pair, prompts, find_divergences(pair, prompts, max_new_tokens=8, batch_size=8)


def _it_with_added_row(pair: ModelPair, favour: int = 7, alpha: float = 3.0):
    """IT with one more unembedding row, alpha x row `favour`: it wins wherever that logit is large enough."""
    it = copy.deepcopy(pair.it)
    it.resize_token_embeddings(NEW + 1, mean_resizing=False)
    with torch.no_grad():
        w = it.get_output_embeddings().weight  # [513, d_model]
        w[NEW] = alpha * w[favour]
    return it


def test_added_it_token_is_never_scored_and_the_rest_score_as_before():
    base, prompts, before = _base()
    it_tok = word_tokenizer()
    it_tok.add_tokens(["wNEW"])
    pair = ModelPair.from_models(
        base.pt, _it_with_added_row(base), base.tokenizer, it_tok, family="llama", pair_id="tiny-llama"
    )
    after = find_divergences(pair, prompts, max_new_tokens=8, batch_size=8)
    rejected = [e for e in after if e.t_it == NEW]
    assert len(rejected) == 9  # IT emits the added token on 9 of 32 prompts
    for e in rejected:
        assert (e.diverged, e.reason, e.token_check) == (False, TOKEN_MISMATCH, "decode")
        assert (e.t_pt_text, e.t_it_text) == (base.tokenizer.decode([e.t_pt]), "wNEW")
    kept = [e for e in after if e.t_it != NEW]
    assert all(e.diverged and e.reason == DIVERGED and e.token_check is None for e in kept)
    by_id = {e.prompt_id: e for e in before}
    for e in kept:  # untouched by the added token: the very same event
        assert (e.position, e.t_pt, e.t_it, e.prefix_ids) == (
            by_id[e.prompt_id].position,
            by_id[e.prompt_id].t_pt,
            by_id[e.prompt_id].t_it,
            by_id[e.prompt_id].prefix_ids,
        )

    assert (
        format_event_counts(after)
        == "events: 23/32 prompts scored (0 near ties); not scored: token_mismatch 9 (decode 9)"
    )
    table = events_table(after, pair.family, pair.pair_id)
    assert table.num_rows == 32
    flagged = table.filter(pc.equal(table["reason"], TOKEN_MISMATCH))
    assert flagged.num_rows == 9 and set(flagged["token_check"].to_pylist()) == {"decode"}
    assert set(flagged["t_it"].to_pylist()) == {NEW}

    cells = crosspatch(pair, after, readouts=("it", "pt"), batch_size=8)
    ref = crosspatch(base, [by_id[e.prompt_id] for e in kept], readouts=("it", "pt"), batch_size=8)
    assert NEW not in cells["t_it"].to_pylist()
    assert cells["prompt_id"].to_pylist() == ref["prompt_id"].to_pylist()
    assert cells.num_rows == 2 * 23
    for c in CELL_COLUMNS:
        np.testing.assert_allclose(cells[c].to_numpy(), ref[c].to_numpy(), rtol=0, atol=1e-5)


def _renamed_tokenizer(renamed: int) -> PreTrainedTokenizerFast:
    """The tests' word tokenizer with id `renamed` spelled differently (same ids, another string)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(509)}}
    old = next(k for k, v in vocab.items() if v == renamed)
    vocab[f"{old}x"] = vocab.pop(old)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_decode_mismatch_and_prompt_id_mismatch_are_named():
    base, prompts, before = _base()
    target = next(e for e in before[1:] if e.position == 0).t_it  # a token IT emits
    word = base.tokenizer.decode([target])
    prompts[0] = dataclasses.replace(prompts[0], text=f"{prompts[0].text} {word}")  # IT encodes it otherwise
    pair = ModelPair.from_models(
        base.pt, base.it, base.tokenizer, _renamed_tokenizer(target), family="llama", pair_id="renamed"
    )
    after = find_divergences(pair, prompts, max_new_tokens=8, batch_size=8)
    in_prompt = {p.id for p in prompts if target in base.tokenizer.encode(p.text)}
    uses = {e.prompt_id for e in before if target in (*e.prefix_ids, e.t_pt, e.t_it)} - in_prompt
    assert "p000" in in_prompt and uses  # both checks are exercised
    for e, b in zip(after, before, strict=True):
        if e.prompt_id in in_prompt:  # never decoded
            assert (e.diverged, e.reason, e.token_check) == (False, TOKEN_MISMATCH, "prompt_ids")
            assert e.prefix_ids == [] and e.t_pt is None and e.t_it is None
            continue
        expected = (False, TOKEN_MISMATCH, "decode") if e.prompt_id in uses else (True, DIVERGED, None)
        assert (e.diverged, e.reason, e.token_check) == expected, e.prompt_id
        assert (e.t_pt, e.t_it, e.prefix_ids) == (b.t_pt, b.t_it, b.prefix_ids)


def test_target_outside_a_readout_vocabulary_is_rejected_as_vocab():
    base, prompts, _ = _base()
    tok = word_tokenizer()
    tok.add_tokens(["wNEW"])  # one shared tokenizer: decodes agree, but PT has no unembedding row 512
    pair = ModelPair.from_models(base.pt, _it_with_added_row(base), tok, family="llama", pair_id="oov")
    after = find_divergences(pair, prompts, max_new_tokens=8, batch_size=8)
    rejected = [e for e in after if e.t_it == NEW]
    assert len(rejected) == 9
    assert {(e.diverged, e.token_check) for e in rejected} == {(False, "vocab")}
    assert all(e.diverged for e in after if e.t_it != NEW)


def test_target_masked_in_one_readout_is_rejected_as_mask():
    base, prompts, before = _base()
    target = next(e for e in before if e.position == 0).t_it
    pt_tok = word_tokenizer()
    pt_tok.unk_token = base.tokenizer.decode([target])  # PT's mask drops its UNK; IT's tokenizer does not
    assert pt_tok.unk_token_id == target
    pair = ModelPair.from_models(base.pt, base.it, pt_tok, base.tokenizer, family="llama", pair_id="mask")
    after = find_divergences(pair, prompts, max_new_tokens=8, batch_size=8)
    rejected = [e for e in after if e.t_it == target]
    assert rejected and {(e.diverged, e.reason, e.token_check) for e in rejected} == {
        (False, TOKEN_MISMATCH, "mask")
    }
    assert all(e.diverged for e in after if e.t_it != target)
