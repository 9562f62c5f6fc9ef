"""Activation cache: contents equal a direct forward, pad/BOS dropped, kill -9 + resume == uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_sequences
from helpers import wait_for_file
from safetensors.torch import load_file

from crosspatch.engine.errors import PromptFileError
from crosspatch.saes.cache import ActivationCache, build_cache, parse_layers, token_source
from crosspatch.saes.errors import CacheError, DictionaryConfigError

REPO = Path(__file__).resolve().parents[2]


def test_manifest_and_keys(tiny_cache: ActivationCache) -> None:
    m = tiny_cache.manifest
    assert m["complete"] and m["paired"] and m["layers"] == [3, 4]
    assert (
        set(m["models"]) == {"pt", "it"}
        and m["models"]["pt"]["weight_hash"] != m["models"]["it"]["weight_hash"]
    )
    assert m["source"]["hash"] and m["dtype"] == "float32"
    seqs = random_sequences(80)
    assert m["n_tokens"] == sum(len(s) - 1 for s in seqs)  # BOS dropped, nothing else
    assert m["n_sequences"] == 80 and sum(s["n_tokens"] for s in m["shards"]) == m["n_tokens"]
    assert len(m["shards"]) > 3  # several shards of ~400 tokens


def test_activations_equal_direct_forward(tiny_cache: ActivationCache, tiny_llamas) -> None:
    """Row i of the cache is the MLP output of the HF model's own forward at that token."""
    _, it = tiny_llamas
    seq = random_sequences(80)[0]
    got: dict[str, torch.Tensor] = {}
    h = it.model.layers[4].mlp.register_forward_hook(lambda m, a, o: got.__setitem__("out", o))
    h2 = it.model.layers[4].mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("in", a[0]))
    try:
        with torch.no_grad():
            it(torch.tensor([seq]))
    finally:
        h.remove()
        h2.remove()
    shard = load_file(str(tiny_cache.path / tiny_cache.manifest["shards"][0]["file"]))
    rows = shard["seq_index"] == 0
    assert torch.equal(shard["token_ids"][rows], torch.tensor(seq[1:]))
    torch.testing.assert_close(shard["it.L4.mlp_out"][rows], got["out"][0, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shard["it.L4.mlp_in"][rows], got["in"][0, 1:], atol=1e-5, rtol=1e-5)
    assert tiny_cache.sequences("all")[0] == seq


def test_splits_and_batches_are_deterministic(tiny_cache: ActivationCache) -> None:
    held, train = tiny_cache.sequences("heldout"), tiny_cache.sequences("train")
    assert len(held) + len(train) == 80 and held and not set(map(tuple, held)) & set(map(tuple, train))
    keys = ["pt.L4.mlp_out", "it.L4.mlp_out"]
    a = tiny_cache.batches(keys, 32, seed=3)
    first = [next(a) for _ in range(60)]  # > one epoch
    assert first[0].shape == (32, 128)
    b = tiny_cache.batches(keys, 32, seed=3, start_sample=32 * 45)
    for i in range(45, 60):
        assert torch.equal(next(b), first[i])
    n_train = len(tiny_cache.load(keys, "train"))
    n_held = len(tiny_cache.load(keys, "heldout"))
    assert n_train + n_held == tiny_cache.n_tokens and n_held > 0


def _script(out: Path, marker: Path) -> str:
    """A child that builds a cache and, after its 2nd finished shard, writes `marker` and blocks."""
    return f"""
import sys, threading, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from conftest import random_sequences
from crosspatch.engine.organisms.tiny import tiny_model
from crosspatch.saes.cache import build_cache
done = []
def on_shard(rec):
    done.append(rec)
    if len(done) == 2:
        open({str(marker)!r}, "w").close()
        threading.Event().wait()  # held here until the parent kills us
build_cache({str(out)!r}, {{"pt": tiny_model("llama", 0), "it": tiny_model("llama", 1)}}, random_sequences(60, seed=5),
            layers="3,4", shard_tokens=150, batch_size=4, on_shard=on_shard)
"""


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, tiny_llamas) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    marker = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", _script(killed, marker)], env=env, cwd=REPO)
    try:
        wait_for_file(marker, proc)  # two finished shards, the child blocked: kill -9 mid-run
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = json.loads((killed / "manifest.json").read_text())
    assert not before["complete"] and len(before["shards"]) == 2
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(killed)
    pt, it = tiny_llamas
    kwargs = dict(layers="3,4", shard_tokens=150, batch_size=4)
    seqs = random_sequences(60, seed=5)
    resumed_shards: list[dict] = []
    build_cache(killed, {"pt": pt, "it": it}, seqs, on_shard=resumed_shards.append, **kwargs)
    full = build_cache(tmp_path / "full", {"pt": pt, "it": it}, seqs, **kwargs)
    after = json.loads((killed / "manifest.json").read_text())
    assert after["complete"] and after["shards"] == full.manifest["shards"]  # same files, same sha256
    assert after["n_tokens"] == full.n_tokens == sum(len(s) - 1 for s in seqs)
    assert len(resumed_shards) == len(after["shards"]) - len(before["shards"])  # finished shards skipped
    assert sorted(p.name for p in killed.glob("shard_*")) == sorted(
        p.name for p in (tmp_path / "full").glob("shard_*")
    )


def test_resume_with_other_settings_refused(tmp_path: Path, tiny_llamas) -> None:
    pt, _ = tiny_llamas
    seqs = random_sequences(6)
    build_cache(tmp_path, pt, seqs, layers="last:1", shard_tokens=50)
    with pytest.raises(CacheError, match="different layers"):
        build_cache(tmp_path, pt, seqs, layers="last:2", shard_tokens=50)


def test_text_and_prompt_sources(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "1", "prompt": "a"}\n{"id": "2", "formats": {"A": "x", "B": "y"}}\n')
    src = token_source(p)
    assert src.kind == "prompts" and list(src.texts()) == ["a", "y"]
    assert src.describe()["prompt_ids"] == ["1", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "a"}\n{"prompt": "b"}\n')  # the engine's reader: ids required
    with pytest.raises(PromptFileError, match=r"bad\.jsonl line 2: missing 'id'"):
        list(token_source(bad).texts())
    t = tmp_path / "t.txt"
    t.write_text("one\n\ntwo\n")
    assert list(token_source(t).texts()) == ["one", "two"]
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [1, 5, 6]}\n')
    assert list(token_source(ids).sequences(None, 2)) == [[1, 5]]
    with pytest.raises(CacheError, match="tokenizer"):
        list(src.sequences(None, 8))
    with pytest.raises(PromptFileError):
        token_source(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("spec", "match"),
    [("last:9", "last:N"), ("7", "out of range"), ("x", "bad layer spec"), ("-6", "out of range")],
)
def test_bad_layers(spec: str, match: str) -> None:
    with pytest.raises(DictionaryConfigError, match=match):
        parse_layers(spec, 5)


def test_layer_parsing() -> None:
    assert parse_layers("last:3", 5) == [2, 3, 4]
    assert parse_layers("-1,0", 5) == [0, 4]


def test_bad_hook_point_and_missing_cache(tmp_path: Path, tiny_llamas) -> None:
    with pytest.raises(DictionaryConfigError, match="mlp_in, mlp_out"):
        build_cache(tmp_path / "c", tiny_llamas[0], [[1, 5, 6]], hook_points="resid")
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache(tmp_path / "nope")


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "olmo2", "qwen3", "mistral"])
def test_every_family_caches_its_mlp(tmp_path: Path, family: str) -> None:
    """The cached MLP in/out equal the model's own forward for every supported family."""
    from crosspatch.engine.adapters import adapter_for
    from crosspatch.engine.organisms.tiny import tiny_model

    model = tiny_model(family, 0)
    seqs = random_sequences(3, seed=7)
    c = build_cache(tmp_path, model, seqs, layers="last:1", shard_tokens=1000, batch_size=3)
    mlp = adapter_for(model).mlp(4)
    got: dict[str, torch.Tensor] = {}
    h = mlp.register_forward_hook(lambda m, a, o: got.update(i=a[0], o=o))
    try:
        with torch.no_grad():
            model(torch.tensor([seqs[1]]))
    finally:
        h.remove()
    shard = load_file(str(c.path / c.manifest["shards"][0]["file"]))
    rows = shard["seq_index"] == 1
    torch.testing.assert_close(shard["model.L4.mlp_out"][rows], got["o"][0, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shard["model.L4.mlp_in"][rows], got["i"][0, 1:], atol=1e-4, rtol=1e-4)
