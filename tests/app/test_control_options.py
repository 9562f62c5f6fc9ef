"""The anatomy / closure knobs of a job's `control_options`: method defaults, bad values refused at submit."""

from __future__ import annotations

import pydantic
import pytest

from crosspatch.app.schemas.jobs import ControlOptions
from crosspatch.engine.control_suite import CONTROLS
from crosspatch.engine.control_suite import ControlOptions as EngineOptions


def test_defaults_follow_the_method_and_the_engine() -> None:
    o, e = ControlOptions(), EngineOptions()
    assert o.ranks == [1, 4, 16, 64, 256, "full"] and tuple(o.ranks) == e.ranks
    assert tuple(o.closure_alphas) == e.closure_alphas == (0.0, 0.25, 0.5, 1.0, 1.5)
    assert tuple(o.windows) == e.windows == (3, 1) and o.closure_positions == e.closure_positions == "last"
    assert {"anatomy", "closure"} <= set(CONTROLS)


def test_every_job_knob_is_an_engine_knob_with_its_default() -> None:
    """The worker passes the knobs to the engine by name: same names, same defaults, same control names."""
    from dataclasses import fields

    from crosspatch.app.schemas.jobs import CrosspatchSpec

    o, e = ControlOptions().model_dump(exclude={"wrong_descendant"}), EngineOptions()
    assert set(o) <= {f.name for f in fields(EngineOptions)}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in o.items()} == {k: getattr(e, k) for k in o}
    assert o["mlp_windows"] == [3] and o["closure_boundaries"] is None
    spec = CrosspatchSpec(pair_id="p", prompts=[{"id": "a", "text": "x"}], controls=list(CONTROLS))
    assert spec.controls == list(CONTROLS)
    with pytest.raises(pydantic.ValidationError, match="controls"):
        CrosspatchSpec(pair_id="p", prompts=[{"id": "a", "text": "x"}], controls=["anatomy", "nope"])


@pytest.mark.parametrize(
    "bad",
    [{"ranks": [0]}, {"ranks": [4, 4]}, {"ranks": ["half"]}, {"windows": [0]}, {"windows": [1, 1]},
     {"closure_positions": "first"}, {"fit_fraction": 1.0}, {"closure_alphas": []}, {"mlp_windows": [0]},
     {"mlp_windows": [3, 3]}, {"closure_boundaries": [3, 3]}, {"closure_boundaries": []},
     {"closure_boundaries": [True]}, {"wrong_descendant": {}}, {"wrong_descendant": {"pair_id": "a", "path": "b"}},
     {"wrong_descendant": {"path": ""}}, {"selection_seed": 2**63}],
)  # fmt: skip
def test_bad_anatomy_and_closure_options_are_refused(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        ControlOptions(**bad)


def test_the_worker_carries_every_option_into_the_engine_configs() -> None:
    """Non-default API options reach the engine's ControlOptions / MediationConfig unchanged (lists as tuples)."""
    from crosspatch.app.schemas.jobs import MediationOptions
    from crosspatch.app.worker.handlers import _dataclass_from, _mediation_config
    from crosspatch.engine.handoff import HandoffConfig
    from crosspatch.engine.mediation import MediationConfig

    o = ControlOptions(ranks=[2, "full"], windows=[5], n_tries=3, closure_positions="all", fit_fraction=0.3)
    assert _dataclass_from(EngineOptions, o, n_resamples=7, seed=9, batch_size=4) == EngineOptions(
        ranks=(2, "full"), windows=(5,), n_tries=3, closure_positions="all", fit_fraction=0.3,
        n_resamples=7, seed=9, batch_size=4,
    )  # fmt: skip
    m = MediationOptions(
        top_k=40, ks=[10, 40], ablation="pt_value", split_seed=3, handoff=True, handoff_alphas=[0.0, 1.0]
    )
    assert _mediation_config(m, 2, 8) == MediationConfig(
        top_k=40, ks=(10, 40), ablation="pt_value", split_seed=3, boundary=2, batch_size=8,
        handoff=HandoffConfig(alphas=(0.0, 1.0)),
    )  # fmt: skip
