"""Tiny random-initialised configs of every supported family, for the engine's exactness tests, and the
tiny word-level PT/IT pairs that tests and benchmarks build (`tiny_pair`, `random_prompts`, `save_tiny_pair`).

Each config keeps its family's quirks (Gemma3's sliding/full layer mix and embedding scale, OLMo2's
post-norms, Qwen3's q/k norms, GPT-2's learned positions) at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
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
