"""The handoff tables in the service: feature_upstream by hand, balanced rows, DuckDB ingest, the route, figures."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosspatch.app.services.plots import write_figures
from crosspatch.app.store.duckdb import ResultsStore
from crosspatch.engine.handoff import feature_upstream_table, handoff_balanced
from crosspatch.engine.report import format_handoff
from crosspatch.engine.results import FEATURE_ACTS_SCHEMA, HANDOFF_SCHEMA
from crosspatch.engine.stats import Z95
from tests.app.builders import schema_row

PROV = {"kind": "mediation", "spec": {}, "provenance": {}}


def _act(prompt: str, latent: int, itup: float, ptup: float) -> dict:
    row = dict(prompt_id=prompt, layer=4, latent=latent, act_ptup=ptup, act_itup=itup, split="test")
    return schema_row(FEATURE_ACTS_SCHEMA, **row)


def _handoff_row(pair_id: str, analysis: str, stat: str, effect: float, half: float, **kw) -> dict:
    ci = dict(effect=effect, ci_low=effect - half, ci_high=effect + half)
    return schema_row(
        HANDOFF_SCHEMA, pair_id=pair_id, level="pair", analysis=analysis, set_kind="topk", k=4,
        statistic=stat, n=10, **ci, **kw,
    )  # fmt: skip


def test_feature_upstream_by_hand_balanced_rows_ingest_route_and_figures(tmp_path: Path, settings) -> None:
    from tests.app.live import client, live_service

    # 4 test events; feature_acts keeps active latents only, so absent events count as (0, 0)
    acts = pa.Table.from_pylist(
        [_act("e1", 0, 2.0, 0.0), _act("e2", 0, 4.0, 1.0), _act("e1", 1, 0.0, 1.0)],
        schema=FEATURE_ACTS_SCHEMA,
    )
    up = feature_upstream_table(acts, {("p", "test"): 4}).to_pylist()
    assert [r["latent"] for r in up] == [0, 1]
    # latent 0: diffs 2, 3, 0, 0 -> mean 1.25, sample sd 1.5, se 0.75
    assert (up[0]["mean_act_itup"], up[0]["mean_act_ptup"], up[0]["diff"], up[0]["n"]) == (1.5, 0.25, 1.25, 4)
    assert up[0]["ci_low"] == pytest.approx(1.25 - Z95 * 0.75) and up[0]["ci_high"] == pytest.approx(
        1.25 + Z95 * 0.75
    )
    assert up[1]["diff"] == -0.25

    # two pairs of one family: the family row is their unweighted mean, SE = sqrt(sum se^2) / 2
    pairs = pa.Table.from_pylist(
        [
            _handoff_row("p", "dose", "rescue_fraction", 1.0, 0.2, alpha=1.0),
            _handoff_row("q", "dose", "rescue_fraction", 3.0, 0.4, alpha=1.0),
            _handoff_row(
                "p", "rescue_graft", "total", 2.0, 0.1, window_name="early", window_start=0, window_stop=2
            ),
            _handoff_row(
                "p", "rescue_graft", "mediated", 1.9, 0.1, window_name="early", window_start=0, window_stop=2
            ),
        ],
        schema=HANDOFF_SCHEMA,
    )
    table = handoff_balanced(pairs)
    fam = [r for r in table.to_pylist() if r["level"] == "family" and r["statistic"] == "rescue_fraction"]
    bal = [r for r in table.to_pylist() if r["level"] == "balanced" and r["statistic"] == "rescue_fraction"]
    half = Z95 * ((0.2 / Z95) ** 2 + (0.4 / Z95) ** 2) ** 0.5 / 2
    assert fam[0]["effect"] == 2.0 and fam[0]["ci_high"] == pytest.approx(2.0 + half) and fam[0]["n"] == 20
    assert bal[0]["effect"] == 2.0 and bal[0]["family"] is None and bal[0]["alpha"] == 1.0

    # the CLI's text: the early window's total and mediated change
    text = format_handoff(table)
    assert "rescue   early                +2.000 [+1.900, +2.100]  +1.900 [+1.800, +2.000]" in text

    # figures from the handoff table
    written = {p.name for p in write_figures({"handoff": table}, tmp_path / "fig")}
    assert written == {"handoff_dose.png", "handoff_windows.png"}

    # DuckDB ingest and the route
    pq.write_table(acts, tmp_path / "acts.parquet")
    pq.write_table(feature_upstream_table(acts, {("p", "test"): 4}), tmp_path / "up.parquet")
    pq.write_table(table, tmp_path / "handoff.parquet")
    assert settings.duckdb_path is not None
    settings.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(settings.duckdb_path)
    counts = store.ingest(
        "j",
        [("feature_upstream", str(tmp_path / "up.parquet")), ("handoff", str(tmp_path / "handoff.parquet"))],
        PROV,
    )
    assert counts["feature_upstream"] == 2 and counts["handoff"] == table.num_rows
    assert store.query("feature_upstream", dictionary_id="d").column("latent").to_pylist() == [0, 1]
    store.close()
    with (
        live_service(settings, {"ada": "researcher"}, {}) as (server, keys),
        client(server, keys["ada"]) as c,
    ):
        r = c.get("/features/upstream", params={"family": "llama", "limit": 1})
        assert r.status_code == 200, r.text
        (row,) = r.json()["data"]
        assert (row["latent"], row["diff"], row["n"]) == (0, 1.25, 4)
        assert c.get("/features/upstream", params={"split": "train"}).status_code == 422


def test_handoff_options_refuse_a_grid_without_zero(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from helpers import run_cli
    from pydantic import ValidationError

    from crosspatch.app.schemas.jobs import MediationOptions

    assert MediationOptions(handoff=True).handoff_alphas == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValidationError, match="must include 0"):
        MediationOptions(handoff=True, handoff_alphas=[0.5, 1.0])
    code, _, err = run_cli(
        capsys, "mediate", "--dict", "x", "--out", str(tmp_path), "--handoff", "--alphas", "0.5,1"
    )
    assert code == 2 and "must include 0" in err
