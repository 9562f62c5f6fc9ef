"""Statistics: bootstrap coverage, sign-flip null calibration, family-balanced synthesis, summaries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from crosspatch.engine.report import format_summary
from crosspatch.engine.results import CELLS_SCHEMA
from crosspatch.engine.stats import (
    Z95,
    bootstrap_ci,
    family_balanced,
    format_p,
    holm,
    sign_flip_pvalue,
    summarize,
)


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


def _cells(family, interaction, positions, pair_id=None, boundary=3, n_layers=5, headline=3, near_tie=None):
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
            "near_tie": list(near_tie) if near_tie is not None else [None] * n,
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


def _sweep(values: np.ndarray, family="llama", pair_id=None, n_layers=5, headline=3) -> pa.Table:
    """Cells of one pair at boundaries 1..B from `[n, B]` interactions."""
    return pa.concat_tables(
        _cells(family, values[:, j], [0] * len(values), pair_id, j + 1, n_layers, headline)
        for j in range(values.shape[1])
    )


def test_holm_and_sweep_wide_p_by_hand():
    rng = np.random.default_rng(7)
    n, n_perm = 16, 999
    x = np.column_stack([rng.normal(m, 1.0, n) for m in (0.5, 0.6, 1.0, -0.2)])  # [n, 4 boundaries]
    s = summarize(_sweep(x), n_resamples=200, n_permutations=n_perm)
    rows = sorted(
        (r for r in s.to_pylist() if r["level"] == "pair" and r["statistic"] == "interaction"),
        key=lambda r: r["boundary"],
    )
    x = x[np.argsort([f"q{i}" for i in range(n)])]  # flips go to prompts in prompt-id order
    signs = np.random.default_rng(23).integers(0, 2, size=(n_perm, n)) * 2 - 1
    null = np.array([[np.mean(sg * x[:, j]) for j in range(4)] for sg in signs])
    obs = x.mean(axis=0)
    p = (1 + (null >= obs - 1e-12).sum(axis=0)) / (n_perm + 1)
    p_max = (1 + (null.max(axis=1) >= obs.max() - 1e-12).sum()) / (n_perm + 1)
    # Holm by hand: sort ascending, multiply by (m, m-1, ...), running max, cap at 1
    order = np.argsort(p)
    holm_sorted = np.maximum.accumulate(np.minimum(1, p[order] * np.array([4, 3, 2, 1])))
    want = np.empty(4)
    want[order] = holm_sorted
    assert [r["p_value"] for r in rows] == pytest.approx(p, abs=1e-15)
    assert [r["p_adjusted"] for r in rows] == pytest.approx(want, abs=1e-15)
    assert all(r["p_sweep"] == pytest.approx(p_max, abs=1e-15) for r in rows)
    assert p[2] == 1 / (n_perm + 1) and want[2] == 4 / (n_perm + 1)  # the strong boundary sits at the floor
    assert 0 < min(want[0], want[1]) < 1 and want[3] == 1.0 and p_max == 1 / (n_perm + 1)
    assert [r["headline"] for r in rows] == [False, False, True, False]


def test_holm_small_cases():
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]).tolist() == [0.5]
    assert holm([0.4, 0.3]).tolist() == pytest.approx([0.6, 0.6])


def test_the_floor_prints_with_le():
    assert format_p(1 / 20001, 20000) == "≤ 5e-05"
    assert format_p(2 / 20001, 20000) == "0.0001"
    assert format_p(None, 20000) == ""
    s = summarize(
        _cells("llama", [float(v) for v in range(1, 21)], [0] * 20),
        n_permutations=999,
    )
    (p,) = [r["p_value"] for r in s.to_pylist() if r["level"] == "pair" and r["statistic"] == "interaction"]
    assert p == 1 / 1000
    assert "≤ 0.001" in format_summary(s)


def test_two_pairs_of_one_family_both_count():
    a = _cells("llama", [1.0, 1.0, 3.0, 3.0], [0] * 4, pair_id="a")  # mean 2
    b = _cells("llama", [5.0, 7.0, 5.0, 7.0], [0] * 4, pair_id="b")  # mean 6
    c = _cells("qwen3", [0.0, 0.0, 0.0, 0.0], [0] * 4, pair_id="c")
    s = summarize(pa.concat_tables([a, b, c]), n_resamples=300, n_permutations=99).to_pylist()
    inter = [r for r in s if r["statistic"] == "interaction" and r["subset"] == "all"]
    fam = {r["family"]: r for r in inter if r["level"] == "family"}
    (bal,) = [r for r in inter if r["level"] == "balanced"]
    assert fam["llama"]["estimate"] == 4.0 and fam["llama"]["n_pairs"] == 2 and fam["llama"]["n"] == 8
    assert bal["estimate"] == 2.0 and bal["n_pairs"] == 3


def _full_cells(
    family: str, pair_id: str, pt_up: list[tuple[float, float]], it_up: list[tuple[float, float]]
):
    """Cells of one pair from per-prompt (Y[.,PT], Y[.,IT]) under PT-up and IT-up (prompts q0..q{n-1})."""
    n = len(pt_up)
    t = _cells(family, [0.0] * n, [0] * n, pair_id=pair_id)
    pp, pi = [a for a, _ in pt_up], [b for _, b in pt_up]
    ip, ii = [a for a, _ in it_up], [b for _, b in it_up]
    pt_late = [b - a for a, b in pt_up]
    it_late = [b - a for a, b in it_up]
    cols = {
        "y_ptup_ptlate": pp,
        "y_ptup_itlate": pi,
        "y_itup_ptlate": ip,
        "y_itup_itlate": ii,
        "pt_late_effect": pt_late,
        "it_late_effect": it_late,
        "interaction": [i - p for i, p in zip(it_late, pt_late, strict=True)],
    }
    for name, values in cols.items():
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, pa.float64()))
    return t


def test_secondary_scales_and_pooled_null_by_hand():
    """portable / interaction share at pair, family and balanced level, and the pooled null's exact p."""
    import itertools

    rng = np.random.default_rng(11)
    data = {  # pair -> (family, [n, 4] cells Y[PT,PT], Y[PT,IT], Y[IT,PT], Y[IT,IT])
        "a": ("llama", rng.normal([0.0, 0.6, 0.5, 2.5], 0.7, size=(6, 4))),
        "b": ("llama", rng.normal([0.0, 0.2, 0.1, 1.0], 0.7, size=(6, 4))),
        "c": ("qwen3", rng.normal([0.0, 0.5, 0.0, 0.8], 0.7, size=(6, 4))),
    }
    cells = pa.concat_tables(
        _full_cells(fam, pid, [(r[0], r[1]) for r in y], [(r[2], r[3]) for r in y])
        for pid, (fam, y) in data.items()
    )
    n_res, n_perm = 300, 1000
    s = summarize(cells, n_resamples=n_res, n_permutations=n_perm).to_pylist()

    def get(level, stat, key=None):
        return next(
            r
            for r in s
            if r["level"] == level
            and r["statistic"] == stat
            and r["subset"] == "all"
            and key in (None, r["pair_id"] if level == "pair" else r["family"])
        )

    # the prompt resamples every pair's statistics share: seed 23, 6 prompts (q0..q5 sort in order)
    idx = np.random.default_rng(23).integers(0, 6, size=(n_res, 6))

    def parts(y):  # per prompt: (portable num, den), (interaction num, diagonal)
        pt_late, it_late = y[:, 1] - y[:, 0], y[:, 3] - y[:, 2]
        return {
            "portable_share": (pt_late, it_late),
            "interaction_share": (it_late - pt_late, y[:, 3] - y[:, 0]),
        }

    for stat in ("portable_share", "interaction_share"):
        pairs = {pid: parts(y)[stat] for pid, (_, y) in data.items()}
        point = {pid: (num.mean(), den.mean()) for pid, (num, den) in pairs.items()}
        boot = {pid: (num[idx].mean(axis=1), den[idx].mean(axis=1)) for pid, (num, den) in pairs.items()}
        for pid in data:
            row = get("pair", stat, pid)
            lo, hi = np.quantile(boot[pid][0] / boot[pid][1], [0.025, 0.975])
            assert row["estimate"] == pytest.approx(point[pid][0] / point[pid][1], abs=1e-9)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi), abs=1e-9)
        fam_num = {"llama": (point["a"][0] + point["b"][0]) / 2, "qwen3": point["c"][0]}
        fam_den = {"llama": (point["a"][1] + point["b"][1]) / 2, "qwen3": point["c"][1]}
        fam_boot = {
            "llama": ((boot["a"][0] + boot["b"][0]) / 2, (boot["a"][1] + boot["b"][1]) / 2),
            "qwen3": boot["c"],
        }
        for fam in ("llama", "qwen3"):
            row = get("family", stat, fam)
            lo, hi = np.quantile(fam_boot[fam][0] / fam_boot[fam][1], [0.025, 0.975])
            assert row["estimate"] == pytest.approx(fam_num[fam] / fam_den[fam], abs=1e-9)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi), abs=1e-9)
        bal = get("balanced", stat)
        num = (fam_num["llama"] + fam_num["qwen3"]) / 2
        den = (fam_den["llama"] + fam_den["qwen3"]) / 2
        bn = (fam_boot["llama"][0] + fam_boot["qwen3"][0]) / 2
        bd = (fam_boot["llama"][1] + fam_boot["qwen3"][1]) / 2
        assert bal["estimate"] == pytest.approx(num / den, abs=1e-9)  # ratio of the balanced means
        assert (bal["ci_low"], bal["ci_high"]) == pytest.approx(tuple(np.quantile(bn / bd, [0.025, 0.975])))
        assert bal["n_pairs"] == 3 and bal["n"] == 18

    # pooled null: one sign per prompt id across all three pairs; statistic = family-balanced mean
    inter = {pid: parts(y)["interaction_share"][0] for pid, (_, y) in data.items()}

    def balanced(signs):
        llama = (np.mean(signs * inter["a"]) + np.mean(signs * inter["b"])) / 2
        return (llama + np.mean(signs * inter["c"])) / 2

    observed = balanced(np.ones(6))
    null = [balanced(np.array(sg)) for sg in itertools.product([1.0, -1.0], repeat=6)]
    p_exact = sum(v >= observed - 1e-12 for v in null) / 64
    row = get("balanced", "interaction")
    assert row["estimate"] == pytest.approx(observed, abs=1e-9)
    assert row["p_value"] == pytest.approx(p_exact, abs=1e-15) and row["n_permutations"] == 64
    assert 1 / 64 < p_exact < 0.5  # not the floor: the check bites
    assert get("family", "interaction", "llama")["p_value"] is None


def test_pooled_null_draws_when_patterns_exceed_the_budget():
    """More prompts than the budget enumerates: a Monte-Carlo p on the same statistic, seeded."""
    from crosspatch.engine.stats import pooled_sign_flip_test

    ids = [f"q{i:02d}" for i in range(12)]
    fams = [[(ids, np.linspace(0.5, 1.5, 12))], [(ids[:6], np.full(6, -0.1))]]
    p, n = pooled_sign_flip_test(fams, n_permutations=999, seed=3)
    assert n == 999 and p == pooled_sign_flip_test(fams, n_permutations=999, seed=3)[0]
    # exact over 2^12 patterns, by hand
    v = np.linspace(0.5, 1.5, 12) / 24 + np.r_[np.full(6, -0.1) / 12, np.zeros(6)]
    signs = 1 - 2 * (np.arange(4096)[:, None] >> np.arange(12)[None, :] & 1)
    exact = ((signs @ v) >= v.sum() - 1e-12).mean()
    assert pooled_sign_flip_test(fams, n_permutations=4096)[0] == pytest.approx(exact, abs=1e-15)
    assert abs(p - exact) < 0.01
    with pytest.raises(ValueError, match="at least one pair"):
        pooled_sign_flip_test([[]])


def test_no_near_tie_subset_by_hand():
    """'no_near_tie' keeps events flagged false (null is unknown: left out); absent when no flag is known."""
    a = _cells("llama", [1.0, 2.0, 3.0, 4.0], [0, 1, 3, 5], near_tie=[True, False, None, False])
    b = _cells("qwen3", [3.0, 3.0, 3.0, 3.0], [0, 0, 0, 4])  # flags unknown (cells from before the flag)
    s = summarize(pa.concat_tables([a, b]), n_permutations=100)
    inter = [r for r in s.to_pylist() if r["statistic"] == "interaction"]
    got = {(r["level"], r["family"], r["subset"]): r for r in inter}
    row = got[("pair", "llama", "no_near_tie")]
    assert row["n"] == 2 and row["estimate"] == 3.0  # prompts q1, q3: (2 + 4) / 2
    assert got[("family", "llama", "no_near_tie")]["estimate"] == 3.0
    assert ("pair", "qwen3", "no_near_tie") not in got
    assert not any(
        r["subset"] == "no_near_tie" for r in inter if r["level"] == "balanced"
    )  # not every family
