"""Builders shared by the tests: a word-level tokenizer, tiny PT/IT pairs, prompt records."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from crosspatch.engine.organisms.tiny import tiny_model
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord


def word_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Ids 0,1,2 = <pad>, <s>, </s>; words w0..w{V-4}; BOS prepended on encode (like Llama)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def perturbed_copy(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with every weight nudged by `scale` x N(0, 1) noise: a stand-in "IT"."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def tiny_pair(
    family: str = "llama", seed: int = 0, it_scale: float = 0.03, vocab_size: int = 512
) -> ModelPair:
    """A tiny random PT and a perturbed IT of `family` sharing one tokenizer."""
    pt = tiny_model(family, seed=seed, vocab_size=vocab_size)
    it = perturbed_copy(pt, it_scale, seed + 1000) if it_scale else pt
    return ModelPair.from_models(pt, it, word_tokenizer(vocab_size), family=family, pair_id=f"tiny-{family}")


def random_prompts(
    n: int, seed: int = 0, min_len: int = 2, max_len: int = 12, vocab_size: int = 512
) -> list[PromptRecord]:
    """`n` prompts of random words, varied lengths (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        words = torch.randint(0, vocab_size - 3, (length,), generator=g).tolist()
        out.append(PromptRecord(id=f"p{i:03d}", text=" ".join(f"w{w}" for w in words), category=f"c{i % 2}"))
    return out


def save_tiny_pair(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """A tiny random PT and a perturbed IT with the word-level tokenizer, saved as HF directories."""
    pt = tiny_model(family, seed=0)
    it = perturbed_copy(pt, 0.03, 1000)
    tok = word_tokenizer()
    for name, model in (("pt", pt), ("it", it)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "pt", root / "it"


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until a child process creates `path` (its signal that it reached a known point, e.g. held
    before a kill); fail at once if the child exits first. The timeout only bounds a broken child."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before writing {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child did not write {path} within {timeout} s")
        time.sleep(0.02)
