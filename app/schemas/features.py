"""A feature page: what one dictionary latent fires on, what it does, and whether its dictionary can be trusted.

The contract between the feature-page service (`GET /features/page/{dictionary_id}/{latent}`,
`crosspatch feature FAMILY DICT LATENT`) and whoever shows it (the CLI table, the dashboard page).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class FeatureExample(BaseModel):
    """One top-activating event: the scored token highlighted in its decoded context."""

    pair_id: str
    prompt_id: str
    split: str | None = Field(None, description="'fit' or 'test' (the mediation split of the event).")
    context_before: str = Field(
        description="Decoded text before the scored position (prompt + shared prefix)."
    )
    token: str = Field(description="The decoded token at the scored position (t_IT's position).")
    context_after: str = Field("", description="Decoded text after it, if any (e.g. t_IT itself).")
    activation: float = Field(
        description="The latent's activation at the scored position in (IT up, IT late)."
    )
    activation_ptup: float | None = Field(None, description="... in (PT up, IT late): the upstream contrast.")


class HistogramBin(BaseModel):
    """One bin of the latent's activation histogram over the events where it fired."""

    lo: float
    hi: float
    count: int


class LogitToken(BaseModel):
    """A token the latent's decoder direction promotes (or suppresses), read through the unembedding."""

    token: str
    value: float


class GateCheck(BaseModel):
    """One named check of the dictionary's quality gate (method 5.1)."""

    name: str
    value: float | None = None
    threshold: str | None = None
    passed: bool | None = None
    status: str | None = None
    detail: str | None = None


class FeaturePage(BaseModel):
    """Everything a researcher looks at before believing a feature."""

    dictionary_id: str
    latent: int
    family: str | None = None
    layer: int | None = None
    architecture: str | None = Field(None, description="sae / transcoder / crosscoder.")
    branch: str | None = Field(None, description="The dictionary branch the activations are read from.")
    n_events_active: int = Field(0, description="Events where the latent fired (either upstream).")
    mean_act_itup: float | None = Field(None, description="Mean activation in (IT up, IT late).")
    mean_act_ptup: float | None = Field(None, description="Mean activation in (PT up, IT late).")
    examples: list[FeatureExample] = Field(default_factory=list, description="Top-activating events.")
    histogram: list[HistogramBin] = Field(default_factory=list)
    causal_drop: float | None = Field(None, description="Held-out single-feature ablation drop (Y units).")
    causal_drop_lo: float | None = None
    causal_drop_hi: float | None = None
    causal_n: int | None = None
    attribution: float | None = Field(None, description="Fit-split attribution score.")
    decoder_top_tokens: list[LogitToken] = Field(default_factory=list)
    decoder_bottom_tokens: list[LogitToken] = Field(default_factory=list)
    pt_decoder_share: float | None = Field(
        None, description="Crosscoders: the PT branch's share of the decoder norm (0 = IT-only latent)."
    )
    gate: list[GateCheck] = Field(default_factory=list)
    gate_passed: bool | None = None
    label: str | None = Field(None, description="An automatic label, only from a configured labeller.")
