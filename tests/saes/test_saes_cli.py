"""`crosspatch dict ...`: cache -> train -> eval -> list -> show on a tiny model; bad inputs are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_sequences
from helpers import run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crosspatch.engine.organisms.tiny import tiny_model

    d = tmp_path_factory.mktemp("model")
    tiny_model("llama", 1).save_pretrained(d)
    ids = d / "ids.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in random_sequences(40)))
    return d


@pytest.mark.slow
def test_dict_cli_end_to_end(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    code, out, err = run_cli(
        capsys,
        "dict",
        "cache",
        "--it",
        str(model_dir),
        "--source",
        str(model_dir / "ids.jsonl"),
        "--out",
        str(cache),
        "--layers",
        "last:1",
        "--shard-tokens",
        "300",
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["layers"] == [4] and info["roles"] == ["it"] and info["n_tokens"] > 500
    reg = tmp_path / "reg"
    code, out, err = run_cli(
        capsys,
        "dict",
        "train",
        "--cache",
        str(cache),
        "--layer",
        "4",
        "--arch",
        "topk",
        "--role",
        "it",
        "--width",
        "16",
        "--k",
        "2",
        "--tokens",
        "2560",
        "--batch-size",
        "128",
        "--registry",
        str(reg),
        "--splice",
        "--set",
        "dead_feature_window=20",
    )
    assert code == 0, err
    summary = json.loads(out)
    # 40 short sequences hold far fewer than the gate's 10,000 held-out tokens: the gate must fail
    assert summary["gate"] == "failed" and "kl_it" in summary["metrics"] and "step 20/20" in err
    code, out, _ = run_cli(capsys, "dict", "list", "--registry", str(reg))
    assert code == 0 and out.count("\n") == 1 and summary["id"] in out
    code, out, _ = run_cli(capsys, "dict", "show", summary["id"], "--registry", str(reg))
    assert code == 0 and json.loads(out)["width"] == 16
    code, out, _ = run_cli(
        capsys,
        "dict",
        "eval",
        summary["path"],
        "--cache",
        str(cache),
        "--min-fve",
        "-10",
        "--min-heldout-tokens",
        "1",
        "--max-alive",
        "1.0",
    )
    assert code == 0 and json.loads(out)["gate"] == "passed"


CACHE_ARGS = "dict cache --it {model} --source {model}/ids.jsonl --out {tmp}/c"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("dict train --cache {tmp}/nope --layer 4", "no activation cache at"),
        ("dict train --cache {tmp} --layer 4 --width 8 --k 9", "k=9.0 must be in (0, width=8]"),
        ("dict train --cache {tmp} --layer 4 --arch wat", "unknown architecture 'wat'"),
        ("dict train --cache {tmp} --layer 4 --hook resid", "unknown hook point 'resid'"),
        ("dict show {tmp}", "cfg.json missing"),
        (f"{CACHE_ARGS} --layers 9", "layer 9 out of range: the model has 5 layers"),
        (f"{CACHE_ARGS} --hooks x", "unknown hook point(s) ['x']; valid: mlp_in, mlp_out"),
    ],
)
def test_bad_inputs_one_line(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], args: str, message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir)) for a in args.split()]
    code, _, err = run_cli(capsys, *argv)
    last = err.strip().splitlines()[-1]  # (loading a model may print a progress bar first)
    assert code == 1 and last.startswith("crosspatch: error: ") and message in last
    assert sum(line.startswith("crosspatch: error") for line in err.splitlines()) == 1


def test_corrupt_cfg_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cfg.json").write_text("{not json")
    code, _, err = run_cli(capsys, "dict", "show", str(tmp_path))
    assert code == 1 and "corrupt" in err and "cfg.json" in err and err.count("\n") == 1
