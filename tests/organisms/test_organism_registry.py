"""Registry, cache and tokenizer: names, atomic builds, byte-identical rebuilds, plain HF reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosspatch.engine.organisms import CONSTRUCTED, TRAINED, list_organisms, load_expected, organism_path
from crosspatch.engine.organisms.build import BUILDER_VERSION, cache_root
from crosspatch.engine.organisms.tiny import tiny_config
from crosspatch.engine.organisms.tokenizer import build_tokenizer
from crosspatch.engine.prompts import load_prompts


def test_list_organisms_partitions_names() -> None:
    assert list_organisms() == list_organisms("constructed") + list_organisms("trained")
    assert set(list_organisms("constructed")) == set(CONSTRUCTED)
    assert set(list_organisms("trained")) == set(TRAINED)
    with pytest.raises(ValueError, match="kind must be"):
        list_organisms("shipped")


def test_unknown_organism_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="llama_upstream_dependent"):
        organism_path("llama_nonsense")


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CROSSPATCH_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "organisms"
    path = organism_path("qwen3_upstream_only", seed=3)
    assert path == tmp_path / "organisms" / f"qwen3_upstream_only-v{BUILDER_VERSION}-seed3"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left behind


def test_tokenizer_adds_bos_and_matches_tiny_config_ids(tmp_path: Path) -> None:
    tok = build_tokenizer()
    ids = tok.encode("Q: what is 12 + 4 ? A:", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:])[:6] == ["Q", ":", "what", "is", "1", "2"]
    config = tiny_config("llama", vocab_size=len(tok))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode("the cat sees a dog .") == tok.encode("the cat sees a dog .")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_seed_changes_weights(tmp_path: Path) -> None:
    a = _files(organism_path("llama_mediated", cache_dir=tmp_path / "a"))
    b = _files(organism_path("llama_mediated", cache_dir=tmp_path / "b"))
    assert a.keys() == b.keys() and "pt/model.safetensors" in a
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    c = _files(organism_path("llama_mediated", seed=1, cache_dir=tmp_path / "c"))
    assert c["it/model.safetensors"] != a["it/model.safetensors"]


def test_rebuild_replaces_the_cached_organism(tmp_path: Path) -> None:
    path = organism_path("qwen3_self_contained", cache_dir=tmp_path)
    (path / "marker").write_text("stale")
    assert organism_path("qwen3_self_contained", cache_dir=tmp_path) == path
    assert (path / "marker").exists()
    organism_path("qwen3_self_contained", cache_dir=tmp_path, rebuild=True)
    assert not (path / "marker").exists()


@pytest.mark.parametrize("name", list(CONSTRUCTED))
def test_constructed_reloads_with_plain_hf(built, name: str) -> None:
    root = built(name)
    tok = AutoTokenizer.from_pretrained(root / "pt")
    pt = AutoModelForCausalLM.from_pretrained(root / "pt")
    it = AutoModelForCausalLM.from_pretrained(root / "it")
    drop = {"_name_or_path"}
    assert {k: v for k, v in pt.config.to_dict().items() if k not in drop} == {
        k: v for k, v in it.config.to_dict().items() if k not in drop
    }
    assert pt.config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(root / "it").get_vocab() == tok.get_vocab()
    for p in (*pt.parameters(), *it.parameters()):
        assert p.dtype == torch.float32
    assert (root / "pt" / "model.safetensors").stat().st_size < 5_000_000
    prompts = load_prompts(root / "prompts.jsonl")
    heldout = load_prompts(root / "prompts_heldout.jsonl")
    assert not {p.id for p in prompts} & {p.id for p in heldout}
    expected = load_expected(name, cache_dir=root.parent)
    assert expected["name"] == name and expected["boundary"] == round(0.6 * expected["n_layers"])
    json.dumps(expected)  # plain JSON values only
