"""Memory admission: a job's peak device memory from the pair's config.json, before any weight is loaded.

One estimator for the worker (lockstep, staged, or refuse), the service (refuse at submit, queue memory fit)
and `crosspatch recipe paper-core5 --dry-run` (`engine.paper`). Arithmetic on the shapes only:

    weights   one model: parameters (embeddings, attention, MLP; norms ignored, < 0.01%) x bytes per param
    decode    one model's greedy decoding at the longest sequence: KV cache (K and V, every layer) plus the
              last position's fp32 logits and their masked copy
    forward   one model's clean forward without cache: the residual entering every requested boundary block
              (kept for the cross cells), the live residual and block output, the MLP's hidden activations,
              eager attention scores (fp32, every head), and the last position's fp32 logits

    lockstep  = 2 weights + max(2 decode, 2 forward)          both models resident (engine.divergence/crosspatch)
    staged    = 1 weight  + max(decode, forward)              one model resident (engine.staged); stored states
                                                              live in host memory or memory-mapped files
each times (1 + `OVERHEAD`) for the allocator's fragmentation and the framework's own buffers.

`choose_mode(estimate, budget)`: lockstep when it fits, else staged when that fits, else
`MemoryAdmissionError` carrying both estimates and the budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from crosspatch.engine.errors import CrosspatchError

OVERHEAD = 0.10  # allocator fragmentation, CUDA context and workspace buffers (a fraction of the peak)
GB = 1e9
Mode = Literal["lockstep", "staged"]
T = TypeVar("T")
BYTES_PER_PARAM: dict[str, int] = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
}


class MemoryAdmissionError(CrosspatchError):
    """A job that cannot fit the device memory budget even with one model resident (staged)."""


@dataclass(frozen=True)
class Shape:
    """The config.json fields that size a decoder-only checkpoint."""

    n_layers: int
    d_model: int
    d_mlp: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    source: str = ""
    mlp_matrices: int = 3  # gate, up, down (GPT-2: 2)
    n_positions: int = 0  # learned position embeddings (GPT-2)

    @property
    def n_params(self) -> int:
        """Parameters from the shapes (embeddings, attention, MLP; norms ignored, < 0.01%)."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o + k, v
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        mlp = self.mlp_matrices * d * self.d_mlp
        emb = self.vocab * d * (1 if self.tied else 2) + self.n_positions * d
        return self.n_layers * (attn + mlp) + emb


def shape_from_config(config: dict[str, Any], source: str = "") -> Shape:
    """A `Shape` from a config.json dict (Llama, Mistral, Qwen2/3, OLMo2, Gemma3 text or multimodal, GPT-2)."""
    c = config.get("text_config") or config  # Gemma3 multimodal keeps the LM's shape in text_config
    if c.get("model_type") == "gpt2" or "n_embd" in c:
        d = int(c["n_embd"])
        return Shape(
            n_layers=int(c["n_layer"]),
            d_model=d,
            d_mlp=int(c.get("n_inner") or 4 * d),
            vocab=int(c["vocab_size"]),
            n_heads=int(c["n_head"]),
            n_kv_heads=int(c["n_head"]),
            head_dim=d // int(c["n_head"]),
            tied=bool(c.get("tie_word_embeddings", True)),
            qkv_bias=True,
            source=source,
            mlp_matrices=2,
            n_positions=int(c.get("n_positions", 1024)),
        )
    try:
        d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return Shape(
            n_layers=int(c["num_hidden_layers"]),
            d_model=d,
            d_mlp=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]),
            n_heads=heads,
            n_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or d // heads),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
            source=source,
        )
    except KeyError as e:
        raise CrosspatchError(
            f"config {source or '(dict)'} lacks {e.args[0]!r}: cannot size the model"
        ) from None


def read_shape(model_dir: str | Path) -> Shape:
    """The `Shape` of a saved HF model directory, from its config.json alone (no weights read)."""
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        raise CrosspatchError(f"{path} not found: the memory estimate needs the model's config.json")
    return shape_from_config(json.loads(path.read_text()), source=str(path))


def fmt_bytes(n: float) -> str:
    """`73.24 GB` (1e9 bytes), or MB below 0.1 GB (tiny models in tests)."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class Workload:
    """What a job runs at its peak: batch, longest sequence, boundaries kept, weight precision."""

    batch_size: int
    prompt_tokens: int  # the longest prompt (tokens)
    new_tokens: int  # the divergence budget (greedy steps)
    n_boundaries: int = 1
    bytes_per_param: int = 2


@dataclass(frozen=True)
class Estimate:
    """Peak device bytes of one job, per part and per execution mode (see the module docstring)."""

    weights: int  # one model
    decode: int  # one model's KV cache + logits
    forward: int  # one model's clean forward + captured boundary inputs
    lockstep: int
    staged: int

    def describe(self) -> str:
        """One line for logs, errors and provenance."""
        return (
            f"estimated peak {fmt_bytes(self.lockstep)} lockstep (both models resident), "
            f"{fmt_bytes(self.staged)} staged (one model resident); weights {fmt_bytes(self.weights)} per model"
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "decode": self.decode,
            "forward": self.forward,
            "lockstep": self.lockstep,
            "staged": self.staged,
        }


def estimate(shape: Shape, w: Workload) -> Estimate:
    """Peak device memory of a divergence + 2x2 job on a pair of `shape` (both models share it)."""
    if w.batch_size < 1 or w.prompt_tokens < 0 or w.new_tokens < 0:
        raise ValueError(f"workload sizes must be positive, got {w}")
    b, s = w.batch_size, w.prompt_tokens + w.new_tokens
    act = 2 if w.bytes_per_param < 4 else 4  # activations in the weights' dtype
    weights = shape.n_params * w.bytes_per_param
    kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * act  # bytes per token, one model
    logits = b * shape.vocab * 4 * 2  # fp32 last-position logits and their masked copy
    decode = b * s * kv + logits
    resid = b * s * shape.d_model * act
    forward = (
        resid * (w.n_boundaries + 2)  # captured boundary inputs, live residual, block output
        + b * s * shape.d_mlp * act * 2  # MLP hidden (gate x up)
        + b * shape.n_heads * s * s * 4  # eager attention scores, fp32
        + logits
    )
    scale = 1.0 + OVERHEAD
    return Estimate(
        weights=weights,
        decode=decode,
        forward=forward,
        lockstep=int((2 * weights + max(2 * decode, 2 * forward)) * scale),
        staged=int((weights + max(decode, forward)) * scale),
    )


def second_descendant_bytes(est: Estimate) -> int:
    """What a third resident model of the same shape adds (closure's wrong-descendant control)."""
    return int(est.weights * (1.0 + OVERHEAD))


def choose_mode(est: Estimate, budget_bytes: int | None) -> Mode:
    """Lockstep if it fits `budget_bytes` (None: no budget), else staged if that fits, else refuse."""
    if budget_bytes is None or est.lockstep <= budget_bytes:
        return "lockstep"
    if est.staged <= budget_bytes:
        return "staged"
    raise MemoryAdmissionError(
        f"job does not fit the device memory budget of {fmt_bytes(budget_bytes)} even staged: "
        f"{est.describe()}; lower batch_size or max_new_tokens, or give the worker more devices "
        "(CROSSPATCH_DEVICE_MEMORY_GB per device, device 'balanced')"
    )


def admit(shape: Shape, work: Workload, dtype: str, budget_bytes: int | None) -> tuple[Mode, Estimate]:
    """Size `work` on `shape` in `dtype` and choose its mode: the API's and the workers' one admission rule.

    `work.n_boundaries < 0` means a sweep (every boundary, `n_layers - 1`); `work.bytes_per_param` is
    replaced by `dtype`'s. Raises `MemoryAdmissionError` when the job does not fit even staged.
    """
    n_boundaries = shape.n_layers - 1 if work.n_boundaries < 0 else work.n_boundaries
    sized = Workload(
        work.batch_size, work.prompt_tokens, work.new_tokens, n_boundaries, bytes_per_param(dtype)
    )
    est = estimate(shape, sized)
    return choose_mode(est, budget_bytes), est


def bytes_per_param(dtype: str) -> int:
    """Bytes per weight for a dtype name (`bf16` -> 2); unknown names are a clear error."""
    if dtype not in BYTES_PER_PARAM:
        raise CrosspatchError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return BYTES_PER_PARAM[dtype]


def peak_memory_bytes(device: str) -> int:
    """Measured peak: `torch.cuda.max_memory_allocated` on CUDA, else the process's peak RSS."""
    if device.startswith("cuda") or device in ("auto", "balanced", "balanced_low_0", "sequential"):
        import torch

        if torch.cuda.is_available():
            return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run_halving(
    run: Callable[[int], T], batch_size: int, on_halve: Callable[[int, BaseException], None] | None = None
) -> T:
    """`run(batch_size)`; on `torch.OutOfMemoryError` free cached memory, halve the batch and run it again.

    A chunk is redone whole at the smaller batch (its parts are written only when it finishes), so results
    are the same cells; at batch size 1 the error is a `CrosspatchError` naming the estimate's knobs.
    """
    import torch

    while True:
        try:
            return run(batch_size)
        except torch.OutOfMemoryError as e:
            if batch_size <= 1:
                raise CrosspatchError(
                    f"out of memory at batch size 1 ({e}); lower max_new_tokens or give the worker more memory"
                ) from e
            batch_size = max(1, batch_size // 2)
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_halve:
                on_halve(batch_size, e)
