"""Pretrained dictionaries by sae_lens id: resolved from a local Hugging Face cache only, never the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from crosspatch.app.cli import main
from crosspatch.engine.organisms import organism_path
from crosspatch.saes.errors import DictionaryLoadError
from crosspatch.saes.load import parse_pretrained_ref, pretrained_id

# a release in sae_lens's registry that uses sae_lens's own format; its id maps to folder v5_32k_layer_3
RELEASE, SAE_ID = "gpt2-small-mlp-out-v5-32k", "blocks.3.hook_mlp_out"
REPO, FOLDER = "jbloom/GPT2-Small-OAI-v5-32k-mlp-out-SAEs", "v5_32k_layer_3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding one SAE (d_in 64, the trained_gpt2 organism's width) for RELEASE."""
    snapshot = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / FOLDER
    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=64, d_sae=32, k=4, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = SAE_ID
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sae.save_model(snapshot)
    (root / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_parse_and_ids() -> None:
    assert parse_pretrained_ref("sae_lens:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical") == (
        "gemma-scope-2b-pt-res-canonical",
        "layer_20/width_16k/canonical",
    )
    assert parse_pretrained_ref("/some/dir") is None
    with pytest.raises(DictionaryLoadError, match="use sae_lens:RELEASE/SAE_ID"):
        parse_pretrained_ref("sae_lens:no-slash")
    assert pretrained_id(RELEASE, SAE_ID) == "sae_lens:gpt2-small-mlp-out-v5-32k~blocks.3.hook_mlp_out"
    long = pretrained_id("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical/extra")
    assert len(long) == 64 and "/" not in long


def test_mediate_resolves_sae_lens_id_from_the_local_cache(tmp_path: Path, capsys) -> None:
    hub = tmp_path / "hub"
    snapshot = _hf_cache(hub)
    prompts = tmp_path / "prompts.jsonl"
    lines = (organism_path("trained_gpt2") / "prompts.jsonl").read_text().splitlines()[:10]
    prompts.write_text("\n".join(lines) + "\n")
    common = ["--pair", "trained_gpt2", "--prompts", str(prompts), "--top-k", "4", "--ks", "2,4"]
    common += ["--max-new-tokens", "8", "--allow-failed-gate"]
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "0",  # crosspatch itself must switch the hub offline
        "HF_ENDPOINT": "http://127.0.0.1:9",  # and were it to try the network, it would fail
    }
    code = "import sys; from crosspatch.app.cli import main; main(sys.argv[1:])"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "mediate",
            "--dict",
            f"sae_lens:{RELEASE}/{SAE_ID}",
            *common,
            "--out",
            str(tmp_path / "by_id"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    by_id = pq.read_table(tmp_path / "by_id" / "feature_effects.parquet").to_pylist()
    assert {row["dictionary_id"] for row in by_id} == {pretrained_id(RELEASE, SAE_ID)}
    assert {row["layer"] for row in by_id} - {None} == {3}

    # exactly what the same SAE gives as a local directory
    try:
        main(["mediate", "--dict", str(snapshot), *common, "--out", str(tmp_path / "by_dir")])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    by_dir = pq.read_table(tmp_path / "by_dir" / "feature_effects.parquet").to_pylist()
    assert len(by_id) == len(by_dir) > 0
    for a, b in zip(by_id, by_dir, strict=True):
        a.pop("dictionary_id"), b.pop("dictionary_id")
        assert a == b

    # not in the cache: one clear line naming the cache, the repo and the folder; no network tried
    missing = f"sae_lens:{RELEASE}/blocks.2.hook_mlp_out"
    r = subprocess.run(
        [sys.executable, "-c", code, "mediate", "--dict", missing, *common, "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "local Hugging Face cache" in err and str(hub) in err
    assert f"hf download {REPO} --include 'v5_32k_layer_2/*'" in err
    assert "Traceback" not in r.stderr


def test_dict_show_reads_a_pretrained_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    _hf_cache(hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    try:
        main(["dict", "show", f"sae_lens:{RELEASE}/{SAE_ID}"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    meta = json.loads(capsys.readouterr().out)
    assert meta["id"] == pretrained_id(RELEASE, SAE_ID)
    assert (meta["layer"], meta["hook_point"], meta["width"]) == (3, "mlp_out", 32)
    assert meta["source"] == {
        "kind": "sae_lens_pretrained",
        "release": RELEASE,
        "sae_id": SAE_ID,
        "repo_id": REPO,
    }
