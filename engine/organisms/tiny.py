"""Tiny random-initialised configs of every supported family, for the engine's exactness tests, and the
tiny word-level PT/IT pairs that tests and benchmarks build (`tiny_pair`, `random_prompts`, `save_tiny_pair`).

Each config keeps its family's quirks (Gemma3's sliding/full layer mix and embedding scale, OLMo2's
post-norms, Qwen3's q/k norms, GPT-2's learned positions) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.organisms.tokenizer import build_tokenizer
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3", "gpt2")


@dataclass(frozen=True)
class Shape:
    """A model's size in the config keys every family shares (ids 0,1,2 = pad, bos, eos)."""

    layers: int
    d_model: int
    d_mlp: int
    heads: int
    kv_heads: int
    vocab: int = 512
    max_positions: int = 256
    tied: bool = False


# Each `Shape` field's HF config key.
_HF_KEYS = dict(
    layers="num_hidden_layers",
    d_model="hidden_size",
    d_mlp="intermediate_size",
    heads="num_attention_heads",
    kv_heads="num_key_value_heads",
    vocab="vocab_size",
    max_positions="max_position_embeddings",
    tied="tie_word_embeddings",
)


def family_config(family: str, shape: Shape, **extra: object) -> PretrainedConfig:
    """`family`'s HF config of `shape`; `extra` adds (or overrides) keys: the family's own, special ids."""
    keys = {_HF_KEYS[f.name]: getattr(shape, f.name) for f in fields(shape)}
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model("gemma3_text" if family == "gemma3" else family, **{**keys, **ids, **extra})


def gemma3_keys(head_dim: int, window: int, pattern: int) -> dict[str, object]:
    """Gemma3's own keys: `window`-token sliding layers, every `pattern`-th layer full, query scale = head_dim."""
    return dict(
        head_dim=head_dim,
        sliding_window=window,
        layer_types=None,
        sliding_window_pattern=pattern,
        query_pre_attn_scalar=head_dim,
    )


# The tiny shape of every family but GPT-2 (which names its keys its own way).
_FAMILY_KEYS: dict[str, dict[str, object]] = {
    "llama": {},
    "olmo2": {},
    "gemma3": gemma3_keys(head_dim=16, window=4, pattern=2),
    "mistral": dict(sliding_window=6, head_dim=16),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=16),
}


def tiny_config(family: str, vocab_size: int = 512, n_layers: int = 5) -> PretrainedConfig:
    """A few-layer config of `family` with `vocab_size` tokens (ids 0,1,2 = pad, bos, eos)."""
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
            vocab_size=vocab_size,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family not in _FAMILY_KEYS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family_config(family, Shape(n_layers, 64, 128, 4, 2, vocab=vocab_size), **_FAMILY_KEYS[family])


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


def tiny_models(
    family: str, seed: int = 0, perturbation: float = 0.05, n_layers: int = 5
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerFast]:
    """A random PT, an IT = PT + Gaussian noise of std `perturbation` on every matrix, and the organisms'
    shared tokenizer (vocab sized to match), so the pair diverges on prompts like a real PT/IT pair."""
    tokenizer = build_tokenizer()
    pt = tiny_model(family, seed, vocab_size=len(tokenizer), n_layers=n_layers)
    return pt, perturbed_copy(pt, perturbation, seed + 1, matrices_only=True).eval(), tokenizer


# ---- the word-level tiny pairs tests and benchmarks share ----------------------------------------------
def word_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Ids 0,1,2 = <pad>, <s>, </s>; words w0..w{V-4}; BOS prepended on encode (like Llama)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def perturbed_copy(model: nn.Module, scale: float, seed: int, matrices_only: bool = False) -> nn.Module:
    """A copy of `model` with weights nudged by `scale` x N(0, 1) noise (all, or 2-d only): a stand-in "IT"."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.ndim == 2 or not matrices_only:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def tiny_pair(
    family: str = "llama", seed: int = 0, it_scale: float = 0.03, vocab_size: int = 512
) -> ModelPair:
    """A tiny random PT and a perturbed IT of `family` sharing one word-level tokenizer, as a `ModelPair`."""
    pt = tiny_model(family, seed=seed, vocab_size=vocab_size)
    it = perturbed_copy(pt, it_scale, seed + 1000) if it_scale else pt
    return ModelPair.from_models(pt, it, word_tokenizer(vocab_size), family=family, pair_id=f"tiny-{family}")


def random_prompts(
    n: int, seed: int = 0, min_len: int = 2, max_len: int = 12, vocab_size: int = 512
) -> list[PromptRecord]:
    """`n` prompts of random words of `word_tokenizer`, varied lengths (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        words = torch.randint(0, vocab_size - 3, (length,), generator=g).tolist()
        out.append(PromptRecord(id=f"p{i:03d}", text=" ".join(f"w{w}" for w in words), category=f"c{i % 2}"))
    return out


def save_tiny_pair(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """`tiny_pair`'s PT and IT with the word-level tokenizer, saved as HF directories `root/pt`, `root/it`."""
    pt = tiny_model(family, seed=0)
    it = perturbed_copy(pt, 0.03, 1000)
    tok = word_tokenizer()
    for name, model in (("pt", pt), ("it", it)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "pt", root / "it"


def tiny_sweep_spec(chunk_size: int, n_resamples: int, **extra: object) -> dict[str, object]:
    """A crosspatch job spec on `save_tiny_pair`'s pair (registered as tiny-llama): every boundary, both
    readouts, 12 new tokens, batches of 4; `extra` adds the prompts."""
    return {
        "kind": "crosspatch",
        "pair_id": "tiny-llama",
        "boundary": "sweep",
        "readouts": ["it", "pt"],
        "max_new_tokens": 12,
        "batch_size": 4,
        "chunk_size": chunk_size,
        "n_resamples": n_resamples,
        **extra,
    }


def forced_events(
    pair: ModelPair, prompts: Sequence[PromptRecord], t_pt: int = 10, t_it: int = 40, wrap: int | None = None
) -> list[DivergenceEvent]:
    """Diverged events at position 0 on fixed tokens (t_pt + i, t_it + i; i modulo `wrap`), so any pair,
    IT == PT included, scores the same 2x2 on them."""
    return [
        DivergenceEvent(
            prompt_id=p.id,
            category=p.category,
            prompt_ids=pair.tokenizer.encode(p.text),
            diverged=True,
            reason="diverged",
            position=0,
            t_pt=t_pt + (i % wrap if wrap else i),
            t_it=t_it + (i % wrap if wrap else i),
        )
        for i, p in enumerate(prompts)
    ]
