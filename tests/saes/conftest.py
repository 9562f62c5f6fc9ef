"""Fixtures for saes/ tests: planted sparse signals, a tiny model's cache, the `mediated` organism's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crosspatch.saes.cache import ActivationCache, TensorSource, build_cache
from crosspatch.saes.configs import TrainConfig, make_config

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matmuls on a shared 2-core box run ~20x faster on one thread than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted(n: int = 12000, d: int = 32, n_dirs: int = 12, p: float = 0.08, seed: int = 0):
    """`n` rows of sparse combinations of `n_dirs` random unit directions (+ small noise)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=-1)  # [n_dirs, d]
    on = torch.rand(n, n_dirs, generator=g) < p
    mag = 1 + 2 * torch.rand(n, n_dirs, generator=g)
    x = (on * mag) @ dirs + 0.01 * torch.randn(n, d, generator=g)  # [n, d]
    return x, dirs


@pytest.fixture(scope="session")
def planted_source() -> tuple[TensorSource, torch.Tensor]:
    x, dirs = planted()
    return TensorSource({"it.L4.mlp_out": x}), dirs


def fast_config(architecture: str, **overrides: object) -> TrainConfig:
    """A training config for the tests' small planted data (layer 4, batch 128, lr 3e-3, a 50-step dead
    window; auxk 8 and threshold_beta 0.99 for crosscoders): one place for what the tests tune."""
    base: dict[str, object] = dict(layer=4, batch_size=128, lr=3e-3, dead_feature_window=50)
    if architecture.endswith("crosscoder"):
        base.update(auxk=8, threshold_beta=0.99)
    return make_config(architecture, **{**base, **overrides})


def resume_config() -> TrainConfig:
    """The config of the kill-and-resume tests, shared by the killed child and the uninterrupted parent."""
    return fast_config("batchtopk", width=24, k=1, training_tokens=25_600, feature_sampling_window=60)


def random_sequences(n: int, vocab: int = 512, seed: int = 0, lo: int = 6, hi: int = 30) -> list[list[int]]:
    """BOS (id 1) + random ids in [3, vocab), lengths in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(lo, hi, (1,), generator=g))
        out.append([1, *torch.randint(3, vocab, (T,), generator=g).tolist()])
    return out


@pytest.fixture(scope="session")
def tiny_llamas():
    """Two independent tiny random Llama models (pt, it): raw HF models, not a `ModelPair`."""
    from crosspatch.engine.organisms.tiny import tiny_model

    return tiny_model("llama", 0), tiny_model("llama", 1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_llamas) -> ActivationCache:
    pt, it = tiny_llamas
    out = tmp_path_factory.mktemp("tiny-cache")
    return build_cache(
        out,
        {"pt": pt, "it": it},
        random_sequences(80),
        layers="last:2",
        hook_points=("mlp_in", "mlp_out"),
        shard_tokens=400,
        batch_size=8,
    )


@pytest.fixture(scope="session")
def mediated(tmp_path_factory: pytest.TempPathFactory):
    """(pt, it, expected, cache) for the constructed `llama_mediated` organism, final layer mlp_out."""
    from crosspatch.engine.organisms import organism_path
    from crosspatch.engine.organisms.tokenizer import ANSWER_WORDS, SPECIAL_TOKENS, vocabulary
    from crosspatch.engine.pairs import load_model

    root = organism_path("llama_mediated", cache_dir=tmp_path_factory.mktemp("organisms"))
    import json

    expected = json.loads((root / "expected.json").read_text())
    pt, tok = load_model(root / "pt")
    it, _ = load_model(root / "it")
    vocab = vocabulary()
    words = [i for i, w in enumerate(vocab) if w not in SPECIAL_TOKENS and w not in ANSWER_WORDS]
    g = torch.Generator().manual_seed(0)
    seqs = [
        [tok.bos_token_id] + [words[j] for j in torch.randint(len(words), (24,), generator=g)]
        for _ in range(400)
    ]
    cache = build_cache(
        Path(tmp_path_factory.mktemp("mediated-cache")),
        {"pt": pt, "it": it},
        seqs,
        layers="last:1",
        hook_points="mlp_out",
        shard_tokens=4096,
        batch_size=32,
    )
    return pt, it, expected, cache
