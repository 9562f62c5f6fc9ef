"""`crosspatch summarize` on three real pairs (two of one family), each run as the CLI with a sweep.

Every number is recomputed by hand from the cells Parquet files (numpy, independent of engine.stats):
per pair the mean over prompts with its percentile bootstrap CI, per family the mean of its pairs with
SE = sqrt(sum se^2) / m, family-balanced over families at each pair's own headline boundary
(round(0.6 L): 3 of 5 layers, 6 of 10), the depth-matched rows, the sign-flip p with Holm and the
sweep-wide max-statistic p under the same flips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from crosspatch.app.cli import main
from crosspatch.engine.organisms.tiny import tiny_model
from crosspatch.engine.pairs import pair_identity
from tests.app.builders import rows_where
from tests.helpers import cli_ok, perturbed_copy, random_prompts, word_tokenizer

Z = 1.959963984540054
N_PERM = 999


def _save_pair(root: Path, family: str, seed: int, n_layers: int) -> tuple[Path, Path]:
    pt = tiny_model(family, seed=seed, n_layers=n_layers)
    it = perturbed_copy(pt, 0.05, seed + 1000)
    tok = word_tokenizer()
    paths = (root / f"{family}-pt", root / f"{family}-it")
    for path, model in zip(paths, (pt, it), strict=True):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def _boot(x: np.ndarray, seed: int = 23, n_resamples: int = 2000) -> tuple[float, float]:
    """Percentile 95% CI of the mean: resample indices in chunks of 500 from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, 500):
        idx = rng.integers(0, len(x), size=(min(500, n_resamples - start), len(x)))
        means += [x[row].mean() for row in idx]
    lo, hi = np.quantile(np.array(means), [0.025, 0.975])
    return float(lo), float(hi)


def _combine(rows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Unweighted mean with the normal-approximation CI from each (estimate, lo, hi)."""
    est = sum(r[0] for r in rows) / len(rows)
    se = np.sqrt(sum(((hi - lo) / (2 * Z)) ** 2 for _, lo, hi in rows)) / len(rows)
    return est, est - Z * se, est + Z * se


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("summarize")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": p.id, "prompt": p.text, "category": p.category}) + "\n"
            for p in random_prompts(14, seed=3)
        )
    )
    specs = {"a": ("llama", 0, 5), "b": ("llama", 1, 5), "c": ("qwen3", 2, 10)}
    cells = {}
    for name, (family, seed, n_layers) in specs.items():
        pt, it = _save_pair(root / name, family, seed, n_layers)
        cells[name] = root / f"cells_{name}.parquet"
        extra = ["--summary-out", str(root / "summary_a.parquet")] if name == "a" else []
        _run_args = ["run", "--pt", str(pt), "--it", str(it), "--prompts", str(prompts), "--family", family]
        _run_args += ["--boundary", "sweep", "--max-new-tokens", "24", "--out", str(cells[name]), *extra]
        main(_run_args)
    return {"root": root, "cells": cells}


def test_summarize_equals_a_hand_computation_from_the_cells(swept: dict, capsys) -> None:
    root, files = swept["root"], swept["cells"]
    out = root / "summary.parquet"
    printed = cli_ok(
        capsys, "summarize", *map(str, files.values()), "--out", str(out), "--n-permutations", str(N_PERM)
    )
    summary = pq.read_table(out).to_pylist()
    cells = {k: pq.read_table(v).to_pylist() for k, v in files.items()}

    # the two llama pairs sit in a/ and b/ under the same folder names: one label, two ids
    ids = {k: {r["pair_id"] for r in rows} for k, rows in cells.items()}
    assert all(len(v) == 1 for v in ids.values()) and len(set.union(*ids.values())) == 3
    assert (
        {r["pair_label"] for r in cells["a"]}
        == {r["pair_label"] for r in cells["b"]}
        == {"llama-pt~llama-it"}
    )
    for k, rows in cells.items():
        assert {r["headline_boundary"] for r in rows} == ({6} if k == "c" else {3})
        assert {r["n_layers"] for r in rows} == ({10} if k == "c" else {5})

    # per pair and boundary: mean over prompts, percentile bootstrap (2000, seed 23)
    hand: dict[tuple[str, int], tuple[float, float, float]] = {}
    for k, rows in cells.items():
        pid = next(iter(ids[k]))
        for b in sorted({r["boundary"] for r in rows}):
            x = np.array(
                [r["interaction"] for r in sorted(rows, key=lambda r: r["prompt_id"]) if r["boundary"] == b]
            )
            hand[(pid, b)] = (float(x.mean()), *_boot(x))
    got = {
        (r["pair_id"], r["boundary"]): r
        for r in rows_where(summary, level="pair", statistic="interaction", subset="all")
    }
    assert set(got) == set(hand)
    for key, (est, lo, hi) in hand.items():
        r = got[key]
        assert (r["estimate"], r["ci_low"], r["ci_high"]) == pytest.approx((est, lo, hi), abs=1e-9), key
        assert r["headline"] == (key[1] == (6 if key[0] in ids["c"] else 3))
        assert r["depth"] == pytest.approx(key[1] / (10 if key[0] in ids["c"] else 5), abs=1e-12)

    # per family at each pair's headline: llama = mean of pairs a and b (boundary 3); qwen3 = pair c (6)
    a, b, c = (next(iter(ids[k])) for k in "abc")
    fam = {
        r["family"]: r
        for r in rows_where(summary, level="family", headline=True, statistic="interaction", subset="all")
    }
    llama = _combine([hand[(a, 3)], hand[(b, 3)]])
    qwen3 = _combine([hand[(c, 6)]])
    assert (fam["llama"]["estimate"], fam["llama"]["ci_low"], fam["llama"]["ci_high"]) == pytest.approx(
        llama, abs=1e-9
    )
    assert (fam["qwen3"]["estimate"], fam["qwen3"]["ci_low"], fam["qwen3"]["ci_high"]) == pytest.approx(
        qwen3, abs=1e-9
    )
    assert fam["llama"]["n_pairs"] == 2 and fam["llama"]["boundary"] == 3 and fam["qwen3"]["boundary"] == 6

    # family-balanced at the headline boundaries (never the first swept boundary, never one pair dropped)
    (bal,) = [
        r
        for r in summary
        if r["level"] == "balanced"
        and r["headline"]
        and r["statistic"] == "interaction"
        and r["subset"] == "all"
    ]
    want = _combine([llama, qwen3])
    assert (bal["estimate"], bal["ci_low"], bal["ci_high"]) == pytest.approx(want, abs=1e-9)
    assert bal["n_pairs"] == 3 and bal["depth"] == pytest.approx(0.6) and bal["boundary"] is None
    first = _combine([_combine([hand[(a, 1)], hand[(b, 1)]]), _combine([hand[(c, 1)]])])
    assert abs(bal["estimate"] - first[0]) > 1e-6

    # depth-matched rows: 5 and 10 layers share depths 0.2, 0.4, 0.6, 0.8 (b/L equal as fractions)
    depth_rows = {
        r["depth"]: r
        for r in summary
        if r["level"] == "balanced"
        and not r["headline"]
        and r["statistic"] == "interaction"
        and r["subset"] == "all"
    }
    assert sorted(depth_rows) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    d = next(v for k, v in depth_rows.items() if abs(k - 0.4) < 1e-9)  # boundary 2 of 5, 4 of 10
    want = _combine([_combine([hand[(a, 2)], hand[(b, 2)]]), _combine([hand[(c, 4)]])])
    assert (d["estimate"], d["ci_low"], d["ci_high"]) == pytest.approx(want, abs=1e-9)

    # sign-flip p per boundary, Holm over the sweep, sweep-wide max statistic: same flips for all boundaries
    rows_c = sorted(cells["c"], key=lambda r: (r["prompt_id"], r["boundary"]))
    bs = sorted({r["boundary"] for r in rows_c})
    x = np.array(
        [
            [r["interaction"] for r in rows_c if r["prompt_id"] == p]
            for p in sorted({r["prompt_id"] for r in rows_c})
        ]
    )
    n = len(x)
    rng = np.random.default_rng(23)
    signs = rng.integers(0, 2, size=(N_PERM, n)) * 2 - 1  # one chunk: N_PERM < 1000
    null = np.array([[np.mean(s * x[:, j]) for j in range(len(bs))] for s in signs])  # [perm, B]
    obs = x.mean(axis=0)
    p = (1 + (null >= obs - 1e-12).sum(axis=0)) / (N_PERM + 1)
    p_max = (1 + (null.max(axis=1) >= obs.max() - 1e-12).sum()) / (N_PERM + 1)
    order = np.argsort(p, kind="stable")
    holm, running = np.empty(len(p)), 0.0
    for rank, j in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[j]))
        holm[j] = running
    for j, bnd in enumerate(bs):
        r = got[(c, bnd)]
        assert r["p_value"] == pytest.approx(p[j], abs=1e-12)
        assert r["p_adjusted"] == pytest.approx(holm[j], abs=1e-12)
        assert r["p_sweep"] == pytest.approx(p_max, abs=1e-12) and r["n_permutations"] == N_PERM

    # the printed table names every pair, marks the headline, reports the sweep-wide p
    assert all(pid in printed for pid in (a, b, c))
    assert "family llama (2 pairs)" in printed and "family-balanced" in printed
    assert "sweep-wide p" in printed and "b*" in printed


def test_run_summary_out_is_summarize_of_its_cells(swept: dict, capsys) -> None:
    root = swept["root"]
    out = root / "summary_a_again.parquet"
    cli_ok(capsys, "summarize", str(swept["cells"]["a"]), "--out", str(out))
    assert pq.read_table(root / "summary_a.parquet").equals(pq.read_table(out))


def test_pair_ids_differ_for_the_same_folder_names(tmp_path: Path) -> None:
    for d in ("a", "b"):
        for m in ("llama-pt", "llama-it"):
            (tmp_path / d / m).mkdir(parents=True)
    id_a, label_a = pair_identity(tmp_path / "a/llama-pt", tmp_path / "a/llama-it")
    id_b, label_b = pair_identity(tmp_path / "b/llama-pt", tmp_path / "b/llama-it")
    assert label_a == label_b == "llama-pt~llama-it" and id_a != id_b
    assert id_a.startswith("llama-pt~llama-it-")
    assert pair_identity(tmp_path / "a/llama-pt", tmp_path / "a/llama-it") == (id_a, label_a)
    assert pair_identity("org/m", "org/m-it", "rev1")[0] != pair_identity("org/m", "org/m-it", "rev2")[0]


def test_summarize_rejects_a_shared_id_and_old_files(swept: dict, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    a = pq.read_table(swept["cells"]["a"])
    c = pq.read_table(swept["cells"]["c"])
    clash = c.set_column(
        c.schema.get_field_index("pair_id"), "pair_id", pa.array([a["pair_id"][0].as_py()] * len(c))
    )
    pq.write_table(clash, tmp_path / "clash.parquet")
    old = a.drop_columns(["n_layers", "headline_boundary"])
    pq.write_table(old, tmp_path / "old.parquet")
    for bad, words in (("clash.parquet", "share one id"), ("old.parquet", "missing n_layers")):
        with pytest.raises(SystemExit) as e:
            main(["summarize", str(swept["cells"]["a"]), str(tmp_path / bad)])
        assert e.value.code == 1 and words in capsys.readouterr().err
    assert pc.all(pc.equal(a["n_layers"], 5)).as_py()
