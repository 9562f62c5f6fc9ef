"""Figures from small synthetic results tables: every PNG is written, non-empty, and a real PNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from crosspatch.app.config import Settings
from crosspatch.app.services import plots
from crosspatch.engine.results import CELLS_SCHEMA, FEATURE_EFFECTS_SCHEMA
from crosspatch.engine.stats import summarize
from tests.app.builders import effect_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_cells(families=("llama", "qwen3"), boundaries=(2, 3, 4), n_events=12, seed=0) -> pa.Table:
    """Cells with a planted interaction that grows with the boundary."""
    rng = np.random.default_rng(seed)
    rows = []
    for f, family in enumerate(families):
        for b in boundaries:
            for i in range(n_events):
                pp, pi, ip = rng.normal(0, 0.3, 3)
                ii = 1.0 + 0.3 * b + f + rng.normal(0, 0.3)
                rows.append(
                    dict(
                        family=family,
                        pair_id=f"tiny-{family}",
                        prompt_id=f"p{i}",
                        category="c",
                        position=i % 4,
                        t_pt=1,
                        t_it=2,
                        boundary=b,
                        readout="it",
                        pair_label=f"tiny-{family}",
                        n_layers=5,
                        headline_boundary=3 if 3 in boundaries else boundaries[0],
                        y_ptup_ptlate=pp,
                        y_ptup_itlate=pi,
                        y_itup_ptlate=ip,
                        y_itup_itlate=ii,
                        pt_late_effect=pi - pp,
                        it_late_effect=ii - ip,
                        interaction=(ii - ip) - (pi - pp),
                    )
                )
    return pa.Table.from_pylist(rows, schema=CELLS_SCHEMA)


def synthetic_feature_effects(families=("llama", "qwen3")) -> pa.Table:
    rows = []
    for family in families:
        ids = dict(family=family, pair_id=f"tiny-{family}", dictionary_id=f"{family}-d")
        for rank, latent in enumerate((7, 3, 11, 5, 2)):
            score = 1.0 / (rank + 1)
            rows.append(effect_row(**ids, layer=4, k=rank + 1, latent=latent, effect=score))
        for intervention, scale in (("ablate_topk", 1.0), ("ablate_matched_random", 0.1)):
            for k in (1, 2, 4, 8):
                share = scale * (1 - 0.5**k)
                rows.append(
                    effect_row(
                        **ids,
                        layer=None,
                        intervention=intervention,
                        k=k,
                        statistic="share",
                        effect=share,
                        ci_low=share - 0.05,
                        ci_high=share + 0.05,
                    )
                )
    return pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA)


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 2000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def _method6_summaries() -> dict:
    """Hand-written forced-token and continuation summaries (one pair, two categories, N = 0, 1, 2)."""
    import pyarrow as pa

    from crosspatch.engine.results import CONTINUATION_SUMMARY_SCHEMA, FORCED_SUMMARY_SCHEMA

    forced = [
        dict(level=lv, pair_id=pid, category=c, statistic="contrast", view="suffix", mean=m, ci_low=m - 0.1,
             ci_high=m + 0.1, n_events=16, n_families=1)
        for lv, pid in (("pair", "p"), ("balanced", None))
        for c, m in (("CONTENT-REASON", 0.75), ("SAFETY", 0.0))
    ]  # fmt: skip
    cont = [
        dict(pair_id="p", variant="native", n=n, statistic=st, mean=1.0 + n, ci_low=0.5 + n, ci_high=1.5 + n,
             n_events=10)
        for n in (0, 1, 2)
        for st in ("interaction", "tail_interaction")
        if not (n == 0 and st == "tail_interaction")
    ]  # fmt: skip
    return {
        "forced_summaries": pa.Table.from_pylist(forced, schema=FORCED_SUMMARY_SCHEMA),
        "continuation_summaries": pa.Table.from_pylist(cont, schema=CONTINUATION_SUMMARY_SCHEMA),
    }


def _synthetic_controls() -> dict[str, pa.Table]:
    """Tiny offmanifold / baselines / lineage summary tables (the controls' figures)."""
    from crosspatch.engine.control_schemas import (
        BASELINE_SUMMARY_SCHEMA,
        LINEAGE_SCHEMA,
        OFFMANIFOLD_SUMMARY_SCHEMA,
    )

    keys = {"family": "llama", "pair_id": "p", "boundary": 3, "readout": "it"}
    nan = float("nan")
    offm = [{**keys, "statistic": "curve", "alpha": a, "estimate": 2 * a, "ci_low": nan, "ci_high": nan, "n": 8}
            for a in (0.0, 0.5, 1.0)]  # fmt: skip
    offm += [
        {**keys, "statistic": "slope", "alpha": None, "estimate": 2.0, "ci_low": 1.5, "ci_high": 2.5, "n": 8}
    ]
    base = [
        {
            **keys,
            "condition": c,
            "n": 8,
            "interaction": v,
            "ci_low": v - 0.2,
            "ci_high": v + 0.2,
            "share": v / 2,
            "share_ci_low": None,
            "share_ci_high": None,
        }
        for c, v in (("first_divergence", 2.0), ("random_balanced", 1.0), ("pre_divergence", 0.0))
    ]
    lineage = [
        {
            "family": "llama",
            "base_id": "b",
            "boundary": 3,
            "readout": "it",
            "stage": s,
            "n": 8,
            "interaction": v,
            "ci_low": v - 0.1,
            "ci_high": v + 0.1,
        }
        for s, v in (("sft", 0.5), ("dpo", 1.2), ("final", 2.0))
    ]
    return {
        "offmanifold": pa.Table.from_pylist(offm, schema=OFFMANIFOLD_SUMMARY_SCHEMA),
        "baselines": pa.Table.from_pylist(base, schema=BASELINE_SUMMARY_SCHEMA),
        "lineage": pa.Table.from_pylist(lineage, schema=LINEAGE_SCHEMA),
    }


def test_every_figure_from_synthetic_tables(tmp_path: Path) -> None:
    summaries = summarize(synthetic_cells(), n_resamples=50, seed=1, n_permutations=200)
    tables = {
        "summaries": summaries,
        "feature_effects": synthetic_feature_effects(),
        **_method6_summaries(),
        **_synthetic_controls(),
    }
    written = plots.write_figures(tables, tmp_path / "figures")
    assert sorted(p.stem for p in written) == sorted(plots.FIGURE_NAMES)
    for path in written:
        _assert_png(path)


def test_single_boundary_has_no_boundary_figure(tmp_path: Path) -> None:
    summaries = summarize(
        synthetic_cells(families=("gpt2",), boundaries=(3,)), n_resamples=20, n_permutations=50
    )
    written = plots.write_figures({"summaries": summaries}, tmp_path)
    assert [p.stem for p in written] == ["family_2x2"]
    _assert_png(written[0])
    assert plots.write_figures({"summaries": summaries.slice(0, 0)}, tmp_path / "empty") == []


def test_a_failing_figure_is_skipped_not_raised(tmp_path: Path) -> None:
    bad = pa.table({"family": ["llama"], "statistic": ["interaction"]})  # not a summaries table
    written = plots.write_figures(
        {"summaries": bad, "feature_effects": synthetic_feature_effects()}, tmp_path
    )
    # both summaries figures fail on the bad table and are skipped; the feature figures are still drawn
    assert [p.stem for p in written] == ["top_features", "ablation_curve"]
    assert not (tmp_path / "family_2x2.png").exists()
    assert not (tmp_path / "interaction_by_boundary.png").exists()


@contextlib.contextmanager
def _ingesting_jobs(tmp_path: Path, specs: dict[str, dict]) -> Iterator[tuple[Any, Any, dict]]:
    """A migrated SQLite job store and a DuckDB results store holding one `ingesting` job per spec, each
    with one summaries part; yields (store, results, {name: job id})."""
    import pyarrow.parquet as pq

    from crosspatch.app.store.duckdb import ResultsStore
    from crosspatch.app.store.migrate import upgrade
    from crosspatch.app.store.models import JobPart
    from crosspatch.app.store.session import Store
    from tests.app.builders import make_job, make_user

    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade(url)
    store, results = Store(url), ResultsStore(tmp_path / "results.duckdb")
    try:
        owner = make_user(store, "ada")
        summaries = summarize(synthetic_cells(), n_resamples=20, n_permutations=50)
        part = tmp_path / "summaries.parquet"
        pq.write_table(summaries, part)
        jobs = {}
        for name, spec in specs.items():
            jobs[name] = make_job(store, owner, status="ingesting", spec=spec)
            with store.session() as s:
                s.add(
                    JobPart(
                        job_id=jobs[name],
                        part_index=0,
                        name="summaries.all",
                        table_name="summaries",
                        path=str(part),
                        rows=summaries.num_rows,
                    )
                )
        yield store, results, jobs
    finally:
        results.close()
        store.dispose()


def test_ingest_draws_a_succeeded_jobs_figures(tmp_path: Path) -> None:
    """The ingest hook writes figures beside the parts, unless the spec turns them off."""
    from crosspatch.app.services import figures
    from crosspatch.app.services.ingest import ingest_job
    from crosspatch.app.store.models import Job, JobLog

    specs = {"drawn": {"kind": "crosspatch"}, "off": {"kind": "pipeline", "figures": False}}
    with _ingesting_jobs(tmp_path, specs) as (store, results, jobs):
        assert ingest_job(store, results, jobs["drawn"], tmp_path / "data") == "succeeded"
        assert ingest_job(store, results, jobs["off"], tmp_path / "data") == "succeeded"
        drawn = plots.list_figures(tmp_path / "data", jobs["drawn"])
        assert [p.stem for p in drawn] == ["family_2x2", "interaction_by_boundary"]
        for p in drawn:
            _assert_png(p)
        assert plots.list_figures(tmp_path / "data", jobs["off"]) == []
        with store.session(write=False) as s:
            job = s.get(Job, jobs["drawn"])
            assert job is not None
            public = figures.list_public(Settings(data_dir=tmp_path / "data", _env_file=None), job)  # type: ignore[call-arg]
            assert public.count == 2 and public.data[0].url.endswith(f"/jobs/{job.id}/figures/family_2x2.png")
            messages = [m.message for m in s.query(JobLog).filter(JobLog.job_id == jobs["drawn"])]
            assert any("2 figure(s)" in m for m in messages), messages


def test_figure_failure_never_fails_ingest(tmp_path: Path, monkeypatch) -> None:
    """Drawing raises inside a real ingest: the job still succeeds with its rows, and has no figures."""
    from crosspatch.app.services.ingest import ingest_job

    def boom(*_a, **_k):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "write_figures", boom)
    with _ingesting_jobs(tmp_path, {"job": {"kind": "crosspatch"}}) as (store, results, jobs):
        assert ingest_job(store, results, jobs["job"], tmp_path / "data") == "succeeded"
        assert results.job_table("summaries", str(jobs["job"]), limit=1000).num_rows > 0
        assert plots.list_figures(tmp_path / "data", jobs["job"]) == []


def test_closure_by_rank_figure(tmp_path: Path) -> None:
    """Closure by rank: PCA line with controls; an invalid rank is kept on the axis and drawn as not valid."""
    from crosspatch.engine.control_schemas import CLOSURE_SCHEMA

    keys = {"family": "llama", "pair_id": "p", "boundary": 3, "readout": "it", "positions": "last",
            "n_fit": 8, "n_test": 8, "rescued_gap": 1.0, "native_gap": 1.0}  # fmt: skip
    rows = []
    for rank, full, valid in ((1, False, True), (16, False, False), (64, True, True)):
        for arm, value in (("pca", 0.9), ("gaussian", 0.01), ("random", -0.02), ("sign_flip", -0.5)):
            c = value if valid else None
            rows.append({**keys, "arm": arm, "rank": rank, "full_delta": full, "alpha": 1.0, "closure": c,
                         "ci_low": c and c - 0.1, "ci_high": c and c + 0.1, "valid": valid,
                         "reason": None if valid else "too small"})  # fmt: skip
    # a second boundary with a line per alpha and the wrong-descendant control
    for rank, full in ((1, False), (64, True)):
        for arm, alpha, c in (("pca", 0.5, 0.5), ("pca", 1.0, 0.95), ("wrong_descendant", 1.0, 0.3)):
            rows.append({**keys, "boundary": 4, "arm": arm, "rank": rank, "full_delta": full, "alpha": alpha,
                         "closure": c, "ci_low": c - 0.1, "ci_high": c + 0.1, "valid": True, "reason": None})  # fmt: skip
    written = plots.write_figures({"closure": pa.Table.from_pylist(rows, schema=CLOSURE_SCHEMA)}, tmp_path)
    assert [p.name for p in written] == ["closure.png"]
    assert written[0].read_bytes().startswith(PNG_MAGIC) and written[0].stat().st_size > 5000
    one = plots.plot_closure(pa.Table.from_pylist(rows[:12], schema=CLOSURE_SCHEMA), tmp_path / "one.png")
    assert one is not None and one.stat().st_size < written[0].stat().st_size  # one panel, not two
