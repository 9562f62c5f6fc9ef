"""The memory estimator against hand computations, and the mode it picks."""

from __future__ import annotations

import pytest
import torch

from crosspatch.engine.admission import (
    MemoryAdmissionError,
    Workload,
    admit,
    choose_mode,
    estimate,
    run_halving,
    shape_from_config,
)
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.organisms.tiny import tiny_config
from crosspatch.engine.paper import SHAPES


def test_estimate_by_hand_and_modes() -> None:
    shape = shape_from_config(
        tiny_config("llama").to_dict()
    )  # 5 layers, d 64, mlp 128, vocab 512, 4/2 heads of 16
    assert shape.n_params == 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 512 * 64 * 2 == 249_856
    est = estimate(
        shape, Workload(batch_size=2, prompt_tokens=6, new_tokens=4, n_boundaries=1, bytes_per_param=4)
    )
    decode = 2 * 10 * (2 * 5 * 2 * 16 * 4) + 2 * 512 * 4 * 2  # KV cache + fp32 logits (and masked copy)
    forward = 2 * 10 * 64 * 4 * 3 + 2 * 10 * 128 * 4 * 2 + 2 * 4 * 10 * 10 * 4 + 2 * 512 * 4 * 2
    assert (est.weights, est.decode, est.forward) == (249_856 * 4, decode, forward)
    assert est.lockstep == int((2 * 249_856 * 4 + 2 * max(decode, forward)) * 1.1)
    assert est.staged == int((249_856 * 4 + max(decode, forward)) * 1.1)
    assert choose_mode(est, None) == "lockstep" and choose_mode(est, est.lockstep) == "lockstep"
    assert choose_mode(est, est.lockstep - 1) == "staged"
    with pytest.raises(MemoryAdmissionError, match=r"even staged: estimated peak 2\.\d\d MB lockstep"):
        choose_mode(est, est.staged - 1)
    # admit: float32 -> 4 bytes a weight, and n_boundaries < 0 (a sweep) -> every boundary (5 - 1)
    mode, same = admit(shape, Workload(2, 6, 4, n_boundaries=1), "float32", est.lockstep - 1)
    assert (mode, same) == ("staged", est)
    _, swept = admit(shape, Workload(2, 6, 4, n_boundaries=-1), "float32", None)
    assert swept == estimate(shape, Workload(2, 6, 4, n_boundaries=4, bytes_per_param=4))


def test_qwen25_32b_on_one_80gb_gpu_runs_staged() -> None:
    """The method's largest pair: 65.5 GB of bf16 weights per model; both do not fit 80 GB, one does."""
    est = estimate(SHAPES["qwen25_32b"], Workload(batch_size=16, prompt_tokens=120, new_tokens=128))
    assert est.weights == SHAPES["qwen25_32b"].n_params * 2 and 65.4e9 < est.weights < 65.6e9
    assert choose_mode(est, 80_000_000_000) == "staged"


def test_run_halving() -> None:
    seen: list[int] = []

    def run(batch_size: int) -> int:
        seen.append(batch_size)
        if batch_size > 3:
            raise torch.OutOfMemoryError("simulated")
        return batch_size

    assert run_halving(run, 16) == 2 and seen == [16, 8, 4, 2]
    with pytest.raises(CrosspatchError, match="batch size 1"):
        run_halving(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 2)
