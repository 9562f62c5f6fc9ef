"""Plain sae_lens (a subprocess that never imports crosspatch) opens crosspatch's SAE, transcoder and each
crosscoder branch with every metadata field set, and computes the same latents and reconstructions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosspatch.saes.cache import build_cache
from crosspatch.saes.load import load_dictionary, read_meta
from crosspatch.saes.train import make_config, train_dictionary
from tests.saes.conftest import random_sequences

PLAIN_SAE_LENS = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

jobs = json.loads(sys.argv[1])
report = {}
for name, job in jobs.items():
    try:
        sae = SAE.load_from_disk(job["dir"])
    except KeyError as e:
        report[name] = {"error": f"KeyError {e}"}
        continue
    x = load_file(job["x"])["x"]
    acts = sae.encode(x)
    save_file({"acts": acts.contiguous(), "recon": sae.decode(acts).contiguous()}, job["out"])
    report[name] = {
        "architecture": sae.cfg.architecture(),
        "dtype": sae.cfg.dtype,
        "normalize_activations": sae.cfg.normalize_activations,
        "metadata": {k: v for k, v in sae.cfg.metadata.to_dict().items()},
    }
report["crosspatch_imported"] = any(m.split(".")[0] == "crosspatch" for m in sys.modules)
print(json.dumps(report, default=str))
"""


@pytest.fixture(scope="module")
def named_cache(tmp_path_factory: pytest.TempPathFactory, tiny_llamas):
    """A paired cache whose models have hub-style names and whose token source is a file."""
    root = tmp_path_factory.mktemp("named-cache")
    ids = root / "tokens.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in random_sequences(80)))
    pt, it = tiny_llamas
    cache = build_cache(
        root / "cache",
        {"pt": pt, "it": it},
        ids,
        layers="last:1",
        hook_points=("mlp_in", "mlp_out"),
        model_paths={"pt": "org/tiny-pt", "it": "org/tiny-it"},
        max_seq_len=24,
        shard_tokens=400,
        batch_size=8,
    )
    return cache, ids


def _plain(jobs: dict[str, dict[str, str]]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", PLAIN_SAE_LENS, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_plain_sae_lens_opens_sae_transcoder_and_crosscoder_branches(tmp_path: Path, named_cache) -> None:
    cache, ids = named_cache
    layer = cache.layers[0]  # the tiny llama's last layer
    common = dict(layer=layer, width=32, training_tokens=1280, batch_size=128)
    sae = train_dictionary(make_config("topk", k=4, **common), cache, tmp_path / "sae", evaluate=False)
    tc = train_dictionary(
        make_config("batchtopk_transcoder", k=4, **common), cache, tmp_path / "tc", evaluate=False
    )
    cc = train_dictionary(
        make_config("batchtopk_crosscoder", k=4, auxk=4, **common), cache, tmp_path / "cc", evaluate=False
    )
    x = {
        role: cache.load([f"{role}.L{layer}.{hook}"])[:64]  # [64, d]
        for role in ("pt", "it")
        for hook in ("mlp_out",)
    }
    x_in = cache.load([f"it.L{layer}.mlp_in"])[:64]  # [64, d]
    inputs = {"sae": x["it"], "tc": x_in, "cc_pt": x["pt"], "cc_it": x["it"], "cc": x["it"]}
    dirs = {
        "sae": tmp_path / "sae",
        "tc": tmp_path / "tc",
        "cc_pt": tmp_path / "cc" / "branches" / "pt",
        "cc_it": tmp_path / "cc" / "branches" / "it",
        "cc": tmp_path / "cc",
    }
    jobs = {}
    for name, t in inputs.items():
        save_file({"x": t.contiguous()}, str(tmp_path / f"{name}_x.safetensors"))
        jobs[name] = {
            "dir": str(dirs[name]),
            "x": str(tmp_path / f"{name}_x.safetensors"),
            "out": str(tmp_path / f"{name}_out.safetensors"),
        }
    report = _plain(jobs)

    assert report["crosspatch_imported"] is False
    # the crosscoder itself needs crosspatch; its branches do not
    assert report["cc"] == {"error": "KeyError 'crosscoder'"}
    expected_common = {
        "context_size": 24,
        "dataset_path": str(ids),
        "prepend_bos": True,
    }
    site = f"blocks.{layer}.hook_"
    checks = {
        "sae": ("topk", {"hook_name": site + "mlp_out", "model_name": "org/tiny-it"}),
        "tc": (
            "jumprelu_transcoder",
            {"hook_name": site + "mlp_in", "hook_name_out": site + "mlp_out", "model_name": "org/tiny-it"},
        ),
        "cc_pt": ("jumprelu", {"hook_name": site + "mlp_out", "model_name": "org/tiny-pt"}),
        "cc_it": ("jumprelu", {"hook_name": site + "mlp_out", "model_name": "org/tiny-it"}),
    }
    for name, (arch, fields) in checks.items():
        got = report[name]
        assert got["architecture"] == arch, name
        assert got["dtype"] == "float32" and got["normalize_activations"] == "none", name
        md = got["metadata"]
        for key, value in {**expected_common, **fields}.items():
            assert md[key] == value, (name, key, md.get(key))
        assert md["exclude_special_tokens"] == cache.manifest["settings"]["drop_token_ids"]
    assert "hook_name_out" not in report["sae"]["metadata"]
    assert report["cc_pt"]["metadata"]["crosscoder_branch"] == "pt"

    # same numbers as crosspatch computes
    for name, (d, branch) in {
        "sae": (sae, None),
        "tc": (tc, None),
        "cc_pt": (cc, "pt"),
        "cc_it": (cc, "it"),
    }.items():
        got = load_file(jobs[name]["out"])
        acts = d.encode(inputs[name], branch=branch)
        assert (acts > 0).sum() > 0
        if name.startswith("cc"):  # the centring folded into b_enc: equal up to float rounding
            assert torch.allclose(got["acts"], acts, atol=1e-5)
            assert torch.equal(got["acts"] > 0, acts > 0)
        else:
            assert torch.equal(got["acts"], acts)
        assert torch.allclose(got["recon"], d.decode(acts, branch=branch), atol=1e-5)

    # the HF module path stays in crosspatch's metadata
    assert read_meta(tmp_path / "sae")["hf_module"] == f"model.layers.{layer}.mlp"
    assert read_meta(tmp_path / "sae")["hook_name"] == site + "mlp_out"
    # saving a loaded crosscoder again writes its branches again
    copy = load_dictionary(tmp_path / "cc")
    copy.save(tmp_path / "cc2")
    for b in ("pt", "it"):
        assert (tmp_path / "cc2" / "branches" / b / "cfg.json").exists()
        assert (
            json.loads((tmp_path / "cc2" / "branches" / b / "cfg.json").read_text())["metadata"]["model_name"]
            == f"org/tiny-{b}"
        )
