"""Tiny random-initialised configs of every supported family, for the engine's exactness tests.

Each config keeps its family's quirks (Gemma3's sliding/full layer mix and embedding scale, OLMo2's
post-norms, Qwen3's q/k norms, GPT-2's learned positions) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from crosspatch.engine.organisms.tokenizer import build_tokenizer

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3", "gpt2")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(family: str, vocab_size: int = 512, n_layers: int = 5) -> PretrainedConfig:
    """A few-layer config of `family` with `vocab_size` tokens (ids 0,1,2 = pad, bos, eos)."""
    ids = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = {**_COMMON, "num_hidden_layers": n_layers}
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=64,
            n_layer=n_layers,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if family == "gemma3":
        return AutoConfig.for_model(
            "gemma3_text",
            head_dim=16,
            sliding_window=4,
            layer_types=None,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
            **common,
            **ids,
        )
    if family == "mistral":
        return AutoConfig.for_model("mistral", sliding_window=6, head_dim=16, **common, **ids)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", use_sliding_window=False, **common, **ids)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", head_dim=16, **common, **ids)
    if family in ("llama", "olmo2"):
        return AutoConfig.for_model(family, **common, **ids)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_model(family: str, seed: int = 0, vocab_size: int = 512, n_layers: int = 5) -> PreTrainedModel:
    """A random-initialised fp32 model of `family` in eval mode, deterministic in `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, n_layers), dtype=torch.float32)
    # HF's default init is small (std 0.02); widen it so logits differ clearly between tokens and seeds.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def tiny_pair(
    family: str, seed: int = 0, perturbation: float = 0.05, n_layers: int = 5
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerFast]:
    """A random PT, an IT = PT + Gaussian noise of std `perturbation` on every matrix, and the organisms'
    shared tokenizer (vocab sized to match), so the pair diverges on prompts like a real PT/IT pair."""
    tokenizer = build_tokenizer()
    pt = tiny_model(family, seed, vocab_size=len(tokenizer), n_layers=n_layers)
    it = copy.deepcopy(pt)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in it.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * perturbation)
    return pt, it.eval(), tokenizer
