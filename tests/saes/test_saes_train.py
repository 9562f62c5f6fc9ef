"""Training: planted directions recovered, every architecture trains and saves, resume == uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import fast_config, planted, resume_config
from helpers import BOUND, wait_for_file

from crosspatch.saes.cache import TensorSource
from crosspatch.saes.errors import CacheError, DictionaryConfigError
from crosspatch.saes.quality import GateConfig
from crosspatch.saes.train import (
    CONFIGS,
    Progress,
    config_from_dict,
    make_config,
    register_config,
    train_dictionary,
)

REPO = Path(__file__).resolve().parents[2]


# The synthetic sources hold 12,000 rows (about 1,200 held out) and 12 planted features in 24 latents:
# an explicit gate with a lowered held-out minimum and no upper alive bound (the method's defaults are
# 10,000 tokens and [0.01, 0.20], tested in test_saes_gate.py).
SYNTH_GATE = GateConfig(min_heldout_tokens=1000, alive_range=(0.01, 1.0))


def _max_cos(dirs: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (dirs @ torch.nn.functional.normalize(W, dim=-1).T).max(-1).values  # [n_dirs]


@pytest.mark.parametrize(("arch", "extra"), [("batchtopk", {"k": 1}), ("topk", {"k": 2})])
def test_planted_directions_recovered(tmp_path: Path, planted_source, arch: str, extra: dict) -> None:
    src, dirs = planted_source
    cfg = fast_config(arch, width=24, training_tokens=40_000, **extra)
    seen: list[Progress] = []
    d = train_dictionary(cfg, src, tmp_path, progress=seen.append, log_every=50, gate=SYNTH_GATE)
    cos = _max_cos(dirs, d.W_dec["it"])
    assert cos.min() >= 0.9, cos
    assert d.meta["metrics"]["fve_it"] >= 0.9 and d.gate_status == "passed"
    assert seen and seen[-1].step == cfg.total_steps and seen[-1].tokens == cfg.total_steps * 128
    assert seen[-1].tokens_per_s > 0 and 0 <= seen[-1].dead_fraction <= 1 and seen[-1].l0 > 0
    meta = json.loads((tmp_path / "crosspatch_meta.json").read_text())
    assert meta["width"] == 24 and meta["layer"] == 4 and meta["training_tokens"] == cfg.total_steps * 128
    assert meta["gate"]["status"] == "passed" and meta["architecture"] == arch


def test_crosscoder_recovers_shared_and_it_only(tmp_path: Path) -> None:
    """PT = shared features; IT = the same shared features (same directions) + IT-only features."""
    g = torch.Generator().manual_seed(1)
    d, n = 32, 12000
    dirs = torch.nn.functional.normalize(torch.randn(12, d, generator=g), dim=-1)
    shared, it_only = dirs[:8], dirs[8:]
    a_sh = (torch.rand(n, 8, generator=g) < 0.08) * (1 + 2 * torch.rand(n, 8, generator=g))
    a_it = (torch.rand(n, 4, generator=g) < 0.08) * (1 + 2 * torch.rand(n, 4, generator=g))
    pt = a_sh @ shared + 0.01 * torch.randn(n, d, generator=g)
    it = a_sh @ shared + a_it @ it_only + 0.01 * torch.randn(n, d, generator=g)
    src = TensorSource({"pt.L4.mlp_out": pt, "it.L4.mlp_out": it})
    cfg = fast_config("batchtopk_crosscoder", width=24, k=1, training_tokens=150_000)
    x = train_dictionary(cfg, src, tmp_path, gate=SYNTH_GATE)
    W_pt, W_it = x.W_dec["pt"], x.W_dec["it"]
    rel_pt = W_pt.norm(dim=-1) / (W_pt.norm(dim=-1) + W_it.norm(dim=-1))  # [F]: ~0.5 shared, ~0 IT-only
    for v in shared:
        f = int((torch.nn.functional.normalize(W_it, dim=-1) @ v).argmax())
        assert float(torch.nn.functional.normalize(W_it[f], dim=0) @ v) >= 0.9
        assert float(torch.nn.functional.normalize(W_pt[f], dim=0) @ v) >= 0.9
        assert 0.35 <= rel_pt[f] <= 0.65
    for v in it_only:
        f = int((torch.nn.functional.normalize(W_it, dim=-1) @ v).argmax())
        assert float(torch.nn.functional.normalize(W_it[f], dim=0) @ v) >= 0.9
        assert rel_pt[f] <= 0.1
    m = x.meta["metrics"]
    assert m["fve_pt"] >= 0.9 and m["fve_it"] >= 0.9 and x.gate_status == "passed"


@pytest.mark.parametrize("arch", ["batchtopk_transcoder", "batchtopk_skip_transcoder"])
def test_transcoder_learns_a_sparse_map(tmp_path: Path, arch: str) -> None:
    """out = sparse features of `in` written through other directions: the transcoder maps in -> out."""
    x_in, dirs = planted(n=12000, d=32, n_dirs=12, seed=2)
    g = torch.Generator().manual_seed(3)
    write = torch.nn.functional.normalize(torch.randn(12, 32, generator=g), dim=-1)
    x_out = (x_in @ dirs.T).relu() @ write  # [n, 32]
    src = TensorSource({"it.L4.mlp_in": x_in, "it.L4.mlp_out": x_out})
    cfg = fast_config(arch, width=24, k=1, training_tokens=40_000)
    t = train_dictionary(cfg, src, tmp_path)
    assert t.kind == "transcoder" and t.meta["metrics"]["fve_it"] >= 0.75
    assert t.meta["saved_architecture"] == arch.replace("batchtopk", "jumprelu")


def _train_script(out: Path, ckpt_every: int, hold_at_step: int, release: Path | None = None) -> str:
    """A child that trains and, at `hold_at_step`, writes `<out>.held` and blocks until `release` exists
    (forever when `release` is None)."""
    return f"""
import os, sys, threading, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from conftest import planted, resume_config
from crosspatch.saes.cache import TensorSource
from crosspatch.saes.train import train_dictionary
x, _ = planted()
cfg = resume_config()
release = {str(release) if release else None!r}
def progress(p):
    if p.step != {hold_at_step}:
        return
    open({str(out) + ".held"!r}, "w").close()
    if release is None:
        threading.Event().wait()  # held here until the parent kills us
    while not os.path.exists(release):
        time.sleep(0.01)  # the parent signals first, then creates the file: the handler has run by now
train_dictionary(cfg, TensorSource({{"it.L4.mlp_out": x}}), {str(out)!r}, checkpoint_every={ckpt_every},
                 progress=progress, log_every=1, evaluate=False)
"""


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # held at step 61, after the step-60 checkpoint: the kill lands at a known step
    proc = subprocess.Popen([sys.executable, "-c", _train_script(killed, 30, 61)], env=env, cwd=REPO)
    latest = killed / "checkpoints" / "latest.json"
    try:
        wait_for_file(Path(str(killed) + ".held"), proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    step = json.loads(latest.read_text())["step"]
    assert step == 60 and not (killed / "cfg.json").exists()  # killed mid-run
    x, _ = planted()
    src = TensorSource({"it.L4.mlp_out": x})
    cfg = resume_config()
    seen: list[Progress] = []
    resumed = train_dictionary(
        cfg, src, killed, checkpoint_every=30, evaluate=False, progress=seen.append, log_every=1
    )
    assert seen[0].step == step + 1 and seen[0].resumed_from == step  # no step was repeated
    full = train_dictionary(cfg, src, tmp_path / "full", evaluate=False)
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert resumed.meta["train_stats"]["resumed_from_step"] == step
    assert not (killed / "checkpoints").exists()  # cleaned up after the final save


@pytest.mark.slow
def test_sigterm_checkpoints_then_exits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    release = tmp_path / "sigterm-sent"
    proc = subprocess.Popen([sys.executable, "-c", _train_script(out, 0, 5, release)], env=env, cwd=REPO)
    try:
        wait_for_file(Path(str(out) + ".held"), proc)  # the child is held inside step 5's progress
        proc.send_signal(signal.SIGTERM)
        release.touch()
        code = proc.wait(timeout=BOUND)
    finally:
        proc.kill()
    assert code == -signal.SIGTERM  # re-raised with the default handler after checkpointing
    info = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert info["reason"] == "SIGTERM" and info["step"] == 5 and not (out / "cfg.json").exists()


def test_stop_and_resume_in_process(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    cfg = make_config("topk", layer=4, width=16, k=2, training_tokens=12_800, batch_size=128, lr=3e-3)
    assert train_dictionary(cfg, src, tmp_path / "a", checkpoint_every=40, stop_after_steps=40) is None
    a = train_dictionary(cfg, src, tmp_path / "a", evaluate=False)
    b = train_dictionary(cfg, src, tmp_path / "b", evaluate=False)
    assert a.meta["train_stats"]["resumed_from_step"] == 40
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("batchtopk", {"width": 8, "k": 9}, r"k=9 must be in \(0, width=8\]"),
        ("nope", {}, "unknown architecture 'nope'; valid: batchtopk, batchtopk_crosscoder"),
        ("topk", {"hook_point": "resid"}, "unknown hook point 'resid'; valid: mlp_in, mlp_out"),
        ("topk", {"model_role": "paired"}, "valid: pt, it, model"),
        ("batchtopk_crosscoder", {"model_role": "it"}, "valid: paired"),
        ("topk", {"bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
        ("topk", {"training_tokens": 10, "batch_size": 64}, "must be >= batch_size"),
    ],
)
def test_bad_configs(arch: str, kwargs: dict, match: str) -> None:
    with pytest.raises(DictionaryConfigError, match=match):
        make_config(arch, layer=4, **kwargs)


def test_bad_cache_inputs(tmp_path: Path, planted_source) -> None:
    src, _ = planted_source
    with pytest.raises(CacheError, match="no activation cache"):
        train_dictionary(make_config("topk", layer=4, k=2, width=8), tmp_path / "missing", tmp_path / "o")
    with pytest.raises(CacheError, match=r"no activations for 'it\.L2\.mlp_out'"):
        train_dictionary(make_config("topk", layer=2, k=2, width=8), src, tmp_path / "o")


def test_config_registry_round_trip() -> None:
    for name, cls in CONFIGS.items():
        cfg = make_config(name, layer=3, width=16, **({"k": 4} if hasattr(cls, "k") else {}))
        assert config_from_dict(cfg.to_dict()) == cfg
    d = make_config("topk", layer=1, k=2, width=8).to_dict()
    with pytest.raises(DictionaryConfigError, match="unknown key"):
        config_from_dict({**d, "extra": 1})
    foreign = {k: v for k, v in d.items() if k != "written_by"}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert config_from_dict({**foreign, "extra": 1}).k == 2
    assert any("extra" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="already registered"):
        register_config(CONFIGS["topk"])
