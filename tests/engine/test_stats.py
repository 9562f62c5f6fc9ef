"""Statistics: bootstrap coverage, sign-flip null calibration, family-balanced synthesis, summaries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from crosspatch.engine.results import CELLS_SCHEMA
from crosspatch.engine.stats import Z95, bootstrap_ci, family_balanced, sign_flip_pvalue, summarize


def test_bootstrap_ci_covers_the_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        sample = rng.normal(1.5, 2.0, size=60)
        _, lo, hi = bootstrap_ci(sample, n_resamples=1000, seed=t)
        covered += lo <= 1.5 <= hi
    rate = covered / trials
    # percentile bootstrap at n=60 is slightly anti-conservative; 95% nominal +- binomial noise
    assert 0.90 <= rate <= 0.98, rate


def test_bootstrap_is_seeded_and_centered():
    x = np.arange(50, dtype=float)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    mean, lo, hi = bootstrap_ci(x)
    assert mean == 24.5 and lo < mean < hi


def test_sign_flip_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(1)
    p = np.array([sign_flip_pvalue(rng.normal(0, 1, 40), n_permutations=999, seed=i) for i in range(200)])
    # Kolmogorov-Smirnov distance to U(0, 1); 1.36 / sqrt(n) is the 5% critical value
    grid = np.linspace(0, 1, 101)
    ks = np.abs((p[:, None] <= grid[None, :]).mean(axis=0) - grid).max()
    assert ks < 1.36 / np.sqrt(len(p)), ks


def test_sign_flip_detects_a_real_effect():
    rng = np.random.default_rng(2)
    assert sign_flip_pvalue(rng.normal(1.0, 1.0, 40), n_permutations=2000) == pytest.approx(1 / 2001)


def test_family_balanced_by_hand():
    fams = [(1.0, 0.8, 1.2), (2.0, 1.5, 2.5)]
    center, lo, hi = family_balanced(fams)
    se1, se2 = 0.4 / (2 * Z95), 1.0 / (2 * Z95)
    half = Z95 * np.sqrt(se1**2 + se2**2) / 2
    assert center == 1.5
    assert lo == pytest.approx(1.5 - half) and hi == pytest.approx(1.5 + half)


def _cells(family, interaction, positions, pair_id=None, boundary=3, n_layers=5, headline=3):
    n = len(interaction)
    zeros = [0.0] * n
    return pa.table(
        {
            "family": [family] * n,
            "pair_id": [pair_id or f"{family}-p"] * n,
            "prompt_id": [f"q{i}" for i in range(n)],
            "category": ["A" if i % 2 else "B" for i in range(n)],
            "position": positions,
            "t_pt": [1] * n,
            "t_it": [2] * n,
            "boundary": [boundary] * n,
            "readout": ["it"] * n,
            "pair_label": [pair_id or f"{family}-p"] * n,
            "n_layers": [n_layers] * n,
            "headline_boundary": [headline] * n,
            "y_ptup_ptlate": zeros,
            "y_ptup_itlate": zeros,
            "y_itup_ptlate": zeros,
            "y_itup_itlate": list(interaction),
            "pt_late_effect": zeros,
            "it_late_effect": list(interaction),
            "interaction": list(interaction),
        },
        schema=CELLS_SCHEMA,
    )


def test_summarize_families_subsets_and_balanced_mean():
    a = _cells("llama", [1.0, 2.0, 3.0, 4.0], [0, 1, 3, 5])
    b = _cells("qwen3", [3.0, 3.0, 3.0, 3.0], [0, 0, 0, 4])
    s = summarize(pa.concat_tables([a, b]), position_min=(3,), by_category=True, n_permutations=500)
    inter = s.filter(pc.equal(s["statistic"], "interaction")).to_pylist()
    get = {(r["family"], r["subset"]): r for r in inter if r["level"] == "pair"}
    get |= {("__mean__", r["subset"]): r for r in inter if r["level"] == "balanced"}
    assert get[("llama", "all")]["estimate"] == 2.5 and get[("llama", "all")]["n"] == 4
    assert get[("llama", "position>=3")]["estimate"] == 3.5
    assert get[("llama", "category=A")]["estimate"] == 3.0  # rows 1, 3
    assert get[("qwen3", "all")]["ci_low"] == get[("qwen3", "all")]["ci_high"] == 3.0
    assert get[("__mean__", "all")]["estimate"] == 2.75
    assert 0 < get[("llama", "all")]["p_value"] <= 0.1
