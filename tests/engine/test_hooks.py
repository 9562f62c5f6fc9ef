"""engine.hooks.mlp_hooks: edits and captures take effect, and exactly its own hooks go away, even on error."""

import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.hooks import mlp_hooks


def _inputs(pair):
    ids = torch.tensor([pair.tokenizer.encode(p.text) for p in random_prompts(2, min_len=5, max_len=5)])
    return ids, torch.ones_like(ids)  # [2, 6] each


def _n_hooks(adapter, layers):
    return {layer: len(adapter.mlp(layer)._forward_hooks) for layer in layers}


def test_a_raising_hook_leaves_no_hook_behind_and_others_survive():
    pair = tiny_pair("llama")
    a = pair.it_adapter
    ids, mask = _inputs(pair)
    seen = []
    foreign = a.mlp(0).register_forward_hook(lambda m, args, out: seen.append(out.shape))  # someone else's
    before = _n_hooks(a, range(a.n_layers))
    assert before[0] == 1

    def boom(x, out):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), mlp_hooks(a, {0: lambda x, out: None, 1: boom}):
        assert _n_hooks(a, [0, 1]) == {0: 2, 1: 1}
        a.forward_logits(ids, mask)
    assert _n_hooks(a, range(a.n_layers)) == before
    seen.clear()
    a.forward_logits(ids, mask)
    assert seen == [torch.Size([2, 6, a.d_model])]  # the foreign hook still runs, once
    foreign.remove()


def test_a_failed_installation_removes_what_was_installed():
    pair = tiny_pair("llama")
    a = pair.it_adapter
    before = _n_hooks(a, range(a.n_layers))
    hooks = [(0, lambda x, out: None), (a.n_layers + 5, lambda x, out: None)]
    with pytest.raises(IndexError), mlp_hooks(a, hooks):
        pass
    assert _n_hooks(a, range(a.n_layers)) == before


def test_edit_and_capture_match_a_hand_forward():
    pair = tiny_pair("llama")
    a = pair.it_adapter
    ids, mask = _inputs(pair)
    got = {}
    with torch.no_grad():
        clean = a.forward_logits(ids, mask)
        with mlp_hooks(a, [(1, lambda x, out: got.update(x=x, out=out)), (1, lambda x, out: out * 0)]):
            zeroed = a.forward_logits(ids, mask)
        # a hand forward: layer 1's MLP input through the MLP gives the captured output
        assert torch.equal(a.mlp(1)(got["x"]), got["out"])
        with mlp_hooks(a, {1: lambda x, out: None}):
            same = a.forward_logits(ids, mask)
    assert torch.equal(same, clean)  # returning None keeps the output
    assert (zeroed - clean).abs().max() > 1e-3  # zeroing the MLP output changes the logits
    assert _n_hooks(a, [1]) == {1: 0}
