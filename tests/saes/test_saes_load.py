"""Round trips per architecture (also through sae_lens.SAE.load_from_disk), loaders' errors, registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from crosspatch.saes.errors import DictionaryLoadError
from crosspatch.saes.load import load_dictionary, load_pretrained
from crosspatch.saes.registry import DictionaryRegistry
from crosspatch.saes.train import make_config, train_dictionary

ARCHS = {
    "batchtopk": ({"k": 2}, "jumprelu"),
    "topk": ({"k": 2}, "topk"),
    "jumprelu": ({}, "jumprelu"),
    "standard": ({}, "standard"),
    "batchtopk_transcoder": ({"k": 2}, "jumprelu_transcoder"),
    "batchtopk_skip_transcoder": ({"k": 2}, "jumprelu_skip_transcoder"),
    "batchtopk_crosscoder": ({"k": 2, "model_role": "paired", "auxk": 4}, "crosscoder"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip(tmp_path: Path, tiny_cache, arch: str) -> None:
    extra, saved_as = ARCHS[arch]
    cfg = make_config(arch, layer=4, width=32, training_tokens=1280, batch_size=128, **extra)
    d = train_dictionary(cfg, tiny_cache, tmp_path / "a", evaluate=False)
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["architecture"] == saved_as
    x = tiny_cache.load([f"{b}.L4.{'mlp_in' if d.kind == 'transcoder' else 'mlp_out'}" for b in d.branches])[
        :64
    ]
    if d.kind == "crosscoder":
        x = x.reshape(64, 2, -1)  # [n, branch, d]
    acts = d.encode(x)
    assert acts.shape == (64, 32)
    paths = d.save(tmp_path / "b")
    assert [p.name for p in paths] == ["sae_weights.safetensors", "cfg.json", "crosspatch_meta.json"]
    e = load_dictionary(tmp_path / "b")
    assert torch.equal(e.encode(x), acts) and torch.equal(e.decode(acts), d.decode(acts))
    assert e.meta["id"] == d.meta["id"] and e.layer == 4 and e.kind == d.kind
    for b in d.branches:
        assert e.W_dec[b].shape == (32, tiny_cache.d_model) and torch.equal(e.W_dec[b], d.W_dec[b])
    s = SAE.load_from_disk(tmp_path / "b")  # sae_lens opens it (crosscoder: class registered by saes)
    assert s.cfg.architecture() == saved_as
    assert torch.equal(s.encode(x), acts)


def test_crosscoder_branch_encode_and_reconstruct(tmp_path: Path, tiny_cache) -> None:
    cfg = make_config("batchtopk_crosscoder", layer=4, width=32, k=2, training_tokens=1280, batch_size=128)
    d = train_dictionary(cfg, tiny_cache, tmp_path, evaluate=False)
    x = tiny_cache.load(["pt.L4.mlp_out", "it.L4.mlp_out"])[:16].reshape(16, 2, -1)
    solo = d.encode(x[:, 1], branch="it")
    assert solo.shape == (16, 32)
    assert torch.allclose(d.reconstruct(x[:, 1], branch="it"), d.decode(solo, branch="it"))
    assert torch.allclose(d.decode(d.encode(x))[:, 1], d.decode(d.encode(x), branch="it"))
    with pytest.raises(ValueError, match="unknown branch 'x'; this dictionary has pt, it"):
        d.encode(x[:, 0], branch="x")


def test_pretrained_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DictionaryLoadError, match="could not load pretrained dictionary gpt2-small-res-jb/"):
        load_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre")


def test_bad_dirs(tmp_path: Path) -> None:
    with pytest.raises(DictionaryLoadError, match="not a directory"):
        load_dictionary(tmp_path / "missing")
    with pytest.raises(DictionaryLoadError, match=r"cfg\.json missing"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": "topk", "d_in": ')
    with pytest.raises(DictionaryLoadError, match=r"corrupt .*cfg\.json"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": "wat", "d_in": 4, "d_sae": 8}')
    with pytest.raises(DictionaryLoadError, match="unknown architecture 'wat'; known: abstopk"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": "topk", "d_in": 4, "d_sae": 8}')
    with pytest.raises(DictionaryLoadError, match=r"sae_weights\.safetensors missing"):
        load_dictionary(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(DictionaryLoadError, match="could not load dictionary"):
        load_dictionary(tmp_path)


def test_registry(tmp_path: Path, tiny_cache) -> None:
    for arch, extra in (("topk", {"k": 2}), ("batchtopk_crosscoder", {"k": 2, "auxk": 4})):
        cfg = make_config(arch, layer=4, width=16, training_tokens=1280, batch_size=128, **extra)
        train_dictionary(cfg, tiny_cache, tmp_path / arch)
    reg = DictionaryRegistry(tmp_path)
    rows = reg.rows()
    assert len(rows) == 2 and (tmp_path / "index.json").exists()
    xc = reg.rows(kind="crosscoder")[0]
    assert xc["model_role"] == "paired" and xc["layer"] == 4 and xc["width"] == 16 and xc["k"] == 2
    assert xc["gate_status"] == "failed" and "fve_pt" in xc["metrics"]  # ~1,400 tokens < 10,000 held out
    assert set(xc["pair"]) == {"pt", "it"}
    d = reg.load(xc["id"][:12] if len(reg.rows(kind="sae")) else xc["id"])
    assert d.kind == "crosscoder"
    with pytest.raises(DictionaryLoadError, match="no dictionary matching 'zzz'"):
        reg.get("zzz")
