"""The paper-core5 recipe: the plan from published shapes, the dry run on CPU without downloads, a real run
on two organisms (resumable), and the pipeline job spec in examples/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import BOUND  # tests/helpers.py

from crosspatch.engine.organisms import organism_path
from crosspatch.engine.paper import CORE5, SHAPES, PaperPair, check_boundaries, pair_plan, plan, run_recipe
from crosspatch.engine.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[2]

# model-card parameter counts (billions): the shapes must reproduce them
CARD_PARAMS = {"llama31_8b": 8.03, "qwen3_4b": 4.02, "mistral_7b": 7.25, "olmo2_7b": 7.30, "qwen25_32b": 32.5}


def test_plan_from_published_shapes() -> None:
    check_boundaries()  # every pinned boundary is round(0.6 L): 19/32, 22/36, 19/32, 19/32, 38/64
    assert [(p.family, p.boundary, p.shape.n_layers) for p in CORE5] == [
        ("llama31_8b", 19, 32),
        ("qwen3_4b", 22, 36),
        ("mistral_7b", 19, 32),
        ("olmo2_7b", 19, 32),
        ("qwen25_32b", 38, 64),
    ]
    for family, billions in CARD_PARAMS.items():
        assert SHAPES[family].n_params / 1e9 == pytest.approx(billions, rel=0.01)
    llama = pair_plan(CORE5[0])
    load = next(s for s in llama.stages if s.name == "load")
    assert load.memory_gb == pytest.approx(2 * SHAPES["llama31_8b"].n_params * 2 / 1e9)  # PT + IT in bf16
    assert [s.name for s in llama.stages] == [
        "load",
        "divergence",
        "crosspatch",
        "controls",
        "forced_tokens",
        "continuation",
    ]
    plans = {pp.pair.family: pp for pp in plan()}
    assert plans["qwen25_32b"].n_gpus == 3 and plans["llama31_8b"].n_gpus == 1  # 131 GB of weights
    assert all(s.seconds > 0 and s.memory_gb > 0 for pp in plans.values() for s in pp.stages)


def test_dry_run_prints_the_plan_on_cpu_without_downloading(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = "from crosspatch.app.cli import main; main(['recipe', 'paper-core5', '--dry-run'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=BOUND)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for p in CORE5:
        assert f"{p.pt} @ {p.pt_revision[:7]}" in text and f"{p.it} @ {p.it_revision[:7]}" in text
        assert f"{p.boundary}-{p.shape.n_layers - 1}" in text
    assert "qwen25_32b: 32.76B params per model" in text and "3 GPU(s)" in text
    assert "expected wall time" in text and "nothing loaded or downloaded" in text
    assert not hf_home.exists() or not any(hf_home.rglob("*.safetensors"))


def test_examples_pipeline_spec_is_the_recipe() -> None:
    from crosspatch.app.schemas.jobs import JobCreate

    body = JobCreate.model_validate(json.loads((ROOT / "examples" / "paper_core5.json").read_text()))
    assert body.spec.kind == "pipeline"
    assert body.spec.pair_ids == [p.family for p in CORE5]
    assert body.spec.forced_tokens and body.spec.continuation and body.spec.boundary is None


def test_run_on_two_organisms_and_resume(tmp_path: Path) -> None:
    pairs = []
    for name in ("llama_paper_sized", "qwen3_paper_sized"):
        root = organism_path(name)
        pairs.append(PaperPair(name, str(root / "pt"), str(root / "it"), None, None, 3))
    prompts = load_prompts(organism_path("llama_paper_sized") / "prompts.jsonl", limit=4)
    logs: list[str] = []
    stages = ("crosspatch", "forced_tokens", "continuation")
    written = run_recipe(
        pairs, prompts, tmp_path, device="cpu", dtype="float32", stages=stages, log=logs.append
    )
    assert set(written) == {"summaries", "forced_summaries", "continuation_summaries"}
    forced_summary = pq.read_table(written["forced_summaries"]).to_pylist()
    assert {r["n_families"] for r in forced_summary if r["level"] == "balanced"} == {2}
    summaries = pq.read_table(written["summaries"]).to_pylist()
    assert any(r["level"] == "balanced" and r["statistic"] == "interaction" for r in summaries)
    forced = pq.read_table(tmp_path / "llama_paper_sized" / "forced_tokens.parquet")
    assert forced.num_rows == 4 * 4 and set(forced.column("validator").to_pylist()) == {"exact_answer"}
    cont = pq.read_table(tmp_path / "qwen3_paper_sized" / "continuation.parquet").to_pylist()
    cells = pq.read_table(tmp_path / "qwen3_paper_sized" / "cells.parquet").to_pylist()
    it_cells = {r["prompt_id"]: r["interaction"] for r in cells if r["readout"] == "it"}
    for r in cont:
        if r["n"] == 0 and r["variant"] == "native":
            assert r["interaction"] == pytest.approx(it_cells[r["prompt_id"]], abs=1e-5)
    logs.clear()
    run_recipe(pairs, prompts, tmp_path, device="cpu", dtype="float32", stages=stages, log=logs.append)
    assert [m for m in logs if m.endswith("done already")] == [f"{p.family}: done already" for p in pairs]
    with pytest.raises(ValueError, match="unknown stages"):
        run_recipe(pairs, prompts, tmp_path, stages=("nope",))
