"""On a CUDA device (`gpu` marker; skipped elsewhere): the 2x2 and the hooks agree with the CPU run."""

from __future__ import annotations

import pytest
import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.hooks import mlp_hooks
from crosspatch.engine.organisms.tiny import forced_events
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.results import CELL_COLUMNS

pytestmark = pytest.mark.gpu


def _on(pair: ModelPair, device: str) -> ModelPair:
    return ModelPair.from_models(
        pair.pt.to(device), pair.it.to(device), pair.tokenizer, family=pair.family, pair_id=pair.pair_id
    )


def test_cells_on_cuda_equal_cells_on_cpu_in_fp32() -> None:
    cpu = tiny_pair("llama")
    events = forced_events(cpu, random_prompts(6, min_len=3, max_len=9))
    want = crosspatch(cpu, events, boundary=2, batch_size=3).to_pydict()
    got = crosspatch(_on(tiny_pair("llama"), "cuda"), events, boundary=2, batch_size=3).to_pydict()
    assert len(want["prompt_id"]) == 6 and got["prompt_id"] == want["prompt_id"]
    for col in CELL_COLUMNS:
        assert max(abs(a - b) for a, b in zip(want[col], got[col], strict=True)) <= 1e-4, col


def test_a_raising_hook_on_cuda_leaves_no_hook_behind() -> None:
    a = _on(tiny_pair("llama"), "cuda").it_adapter
    ids = torch.tensor([[1, 5, 6, 7]], device="cuda")

    def boom(x: torch.Tensor, out: torch.Tensor) -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), mlp_hooks(a, {1: boom}):
        a.forward_logits(ids, torch.ones_like(ids))
    assert all(len(a.mlp(layer)._forward_hooks) == 0 for layer in range(a.n_layers))


def test_blocks_split_between_cuda_and_cpu_equal_one_device() -> None:
    """Blocks 2..4 on CUDA, the rest on CPU: the residual moves to each block's device; same cells and hooks."""
    cpu = tiny_pair("llama")
    events = forced_events(cpu, random_prompts(6, min_len=3, max_len=9))
    want = crosspatch(cpu, events, boundary=[1, 3], batch_size=3).to_pydict()
    split = tiny_pair("llama")
    for model in (split.pt, split.it):
        for layer in model.model.layers[2:]:
            layer.to("cuda")
        model.model.norm.to("cuda")
        model.lm_head.to("cuda")
    split = ModelPair.from_models(split.pt, split.it, split.tokenizer, family="llama", pair_id=split.pair_id)
    assert [d.type for d in split.pt_adapter.block_devices] == ["cpu", "cpu", "cuda", "cuda", "cuda"]
    seen: list[torch.device] = []
    with mlp_hooks(split.it_adapter, {3: lambda x, out: seen.append(out.device)}):
        got = crosspatch(split, events, boundary=[1, 3], batch_size=3, check_noop=False).to_pydict()
    assert got["prompt_id"] == want["prompt_id"] and seen and all(d.type == "cuda" for d in seen)
    for col in CELL_COLUMNS:
        assert max(abs(a - b) for a, b in zip(want[col], got[col], strict=True)) <= 1e-4, col
