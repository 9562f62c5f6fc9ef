"""Job specs (a discriminated union on `kind`) and the job resource's schema family."""

from __future__ import annotations

import typing
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, model_validator

from crosspatch.engine.control_suite import CONTROLS
from crosspatch.engine.control_suite import ControlOptions as EngineControlOptions

Readout = Literal["it", "pt", "own"]
# Seeds fit a signed 64-bit column and torch/numpy generators; larger ones used to fail in the worker.
MAX_SEED = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
# A boundary is a block index: JSON `true` is not 1 (strict ints refuse booleans and numeric strings).
# (Range checks against the pair's layer count are the service's: 422 on `spec.boundary`.)
Boundary = StrictInt
DEFAULT_KS = (25, 50, 100, 200)
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._~:+-]*$")]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


CHAT_TEMPLATE_HELP = (
    "Wrap each prompt in IT's chat template (both models then see the same templated token ids). Off by "
    "default: the method's headline is raw-shared (method §1.1: raw text, identical token ids, no chat "
    "template); a templated run is a native-chat variant, not the headline estimate. Recorded in provenance."
)


class PromptIn(_Spec):
    """One prompt sent inline."""

    id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=20_000)
    category: str = Field(default="uncategorized", max_length=64)
    expected_answer: str | None = Field(
        default=None, max_length=1024, description="For exact-answer scoring."
    )
    answer_aliases: list[str] = Field(default_factory=list, max_length=64)


class _PromptsSpec(_Spec):
    """Prompts inline, or a JSONL file under the server's model roots (exactly one)."""

    prompts: list[PromptIn] | None = Field(default=None, min_length=1, max_length=100_000)
    prompt_file: str | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_source(self) -> _PromptsSpec:
        if (self.prompts is None) == (self.prompt_file is None):
            raise ValueError("give exactly one of 'prompts' (inline) or 'prompt_file' (a path)")
        if self.prompts is not None and len({p.id for p in self.prompts}) != len(self.prompts):
            raise ValueError("prompt ids must be unique")
        return self


class DivergenceSpec(_PromptsSpec):
    """First divergence of PT and IT greedy decoding, per prompt."""

    kind: Literal["divergence"] = "divergence"
    pair_id: Name
    chat_template: bool = Field(default=False, description=CHAT_TEMPLATE_HELP)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    chunk_size: int = Field(default=64, ge=1, le=10_000, description="Prompts per checkpoint part.")
    event: Literal["first_diff", "first_nonformat_diff", "first_assistant_marker_diff"] = Field(
        default="first_diff",
        description="Event definition (method 1.3): first_diff is the headline; the others scan PT's greedy "
        "rollout from the first divergence for the first disagreement in content / at a chat marker.",
    )


Control = Literal[CONTROLS]  # the engine's names (engine.control_suite.CONTROLS), one source
CONTROLS_HELP = (
    "Controls of the 2x2 run at each pair's headline boundary with the first readout (method 4.3-4.6): "
    "offmanifold (PT->IT interpolation slope, signed-permutation ratio), commitment (IT boundary logit-lens "
    "margin views), baselines (random rollout disagreements, pre-divergence prefix), native_history "
    "(disagreements after native greedy histories), anatomy (final-k window retention, final-MLP margin "
    "interaction, MLP support by depth band; method 4.8), identity_transfer (does grafting the other model's "
    "middle / late blocks or final MLPs make the host pick its token; method 4.8), source_decomposition "
    "(the interaction of the upstream difference's embedding / attention / MLP parts; method 4.8), closure "
    "(boundary-state PCA closure by rank and alpha with gaussian / random / sign-flip controls, and the "
    "wrong-descendant control with `control_options.wrong_descendant`, else reported not valid; method 5.6). "
    "Rows go to the tables the engine names."
)
_DEFAULT = EngineControlOptions()  # the method's defaults, as the engine holds them


def _listed(name: str, min_length: int, max_length: int, description: str) -> Any:
    """A list knob: the engine's default of `name` as a list, and its length bounds."""

    def factory() -> list:
        return list(getattr(_DEFAULT, name))

    return Field(
        default_factory=factory, min_length=min_length, max_length=max_length, description=description
    )


class DescendantIn(_Spec):
    """A descendant of the pair's base: a registered pair (its IT model) or a model path."""

    pair_id: Name | None = Field(default=None, description="A registered pair whose PT is the same base.")
    path: str | None = Field(
        default=None, min_length=1, max_length=1024, description="Under the model roots."
    )

    def label(self) -> str:
        return "wrong_descendant"

    @model_validator(mode="after")
    def _one_source(self) -> DescendantIn:
        if (self.pair_id is None) == (self.path is None):
            raise ValueError(f"{self.label()}: give exactly one of 'pair_id' or 'path'")
        return self


class ControlOptions(_Spec):
    """Knobs of the 2x2 controls (defaults: the engine's, which follow the method)."""

    alphas: list[float] = _listed(
        "alphas", 2, 21, "Interpolation grid of U(a) = (1 - a) U_PT + a U_IT (values in [0, 1])."
    )
    seeds: list[int] = _listed("seeds", 1, 20, "Signed-permutation draws.")
    n_bins: int = Field(
        default=_DEFAULT.n_bins, ge=1, le=20, description="Boundary-margin quantile bins (commitment)."
    )
    rollout_tokens: int = Field(
        default=_DEFAULT.rollout_tokens,
        ge=1,
        le=1024,
        description="Greedy rollout length (baselines, native history).",
    )
    n_tries: int = Field(
        default=_DEFAULT.n_tries, ge=1, le=256, description="Random prefix lengths tried per rollout."
    )
    horizons: list[int] = _listed("horizons", 1, 16, "Native-history horizons.")
    selection_seed: Seed = Field(
        default=_DEFAULT.selection_seed,
        description="Seed of the random baseline choices and closure's split.",
    )
    windows: list[int] = _listed("windows", 1, 16, "Anatomy: final-k windows.")
    mlp_windows: list[int] = _listed(
        "mlp_windows",
        1,
        16,
        "Identity transfer: final-k MLP grafts (a k beyond the pair's blocks: a not-valid row).",
    )
    ranks: list[int | Literal["full"]] = _listed(
        "ranks", 1, 16, "Closure: PCA ranks ('full' = the whole shift)."
    )
    closure_alphas: list[float] = _listed("closure_alphas", 1, 21, "Closure: injection scales.")
    closure_positions: Literal["last", "all"] = Field(
        default=_DEFAULT.closure_positions,
        description="Closure: inject at the scored position (method) or at every position.",
    )
    fit_fraction: float = Field(
        default=_DEFAULT.fit_fraction, gt=0.0, lt=1.0, description="Closure: train share of the events."
    )
    closure_boundaries: list[Boundary] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Closure: boundaries, each run as on its own (default: the controls' boundary).",
    )
    wrong_descendant: DescendantIn | None = Field(
        default=None,
        description="Closure's wrong-descendant control: a second descendant of the pair's PT (a registered "
        "pair's IT or a model path); without it that arm is reported not valid.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> ControlOptions:
        if any(not 0.0 <= a <= 1.0 for a in self.alphas) or len(set(self.alphas)) < 2:
            raise ValueError("alphas must hold at least two distinct values in [0, 1]")
        if any(h < 1 for h in self.horizons) or any(s < 0 for s in self.seeds):
            raise ValueError("horizons must be >= 1 and seeds >= 0")
        for name in ("windows", "mlp_windows"):
            ks = getattr(self, name)
            if any(k < 1 for k in ks) or len(set(ks)) != len(ks):
                raise ValueError(f"{name} must be distinct final-block counts >= 1")
        if any(r != "full" and r < 1 for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError("ranks must be distinct ints >= 1 or 'full'")
        if self.closure_boundaries is not None and len(set(self.closure_boundaries)) != len(
            self.closure_boundaries
        ):
            raise ValueError("closure_boundaries must be distinct")
        return self


def _unique_controls(controls: list[str]) -> None:
    if len(set(controls)) != len(controls):
        raise ValueError("controls must be unique")


class CrosspatchSpec(DivergenceSpec):
    """Divergence, then the 2x2 cross-patch at one boundary, a list, or a sweep; then summaries."""

    kind: Literal["crosspatch"] = "crosspatch"  # type: ignore[assignment]
    boundary: Boundary | list[Boundary] | Literal["sweep"] | None = Field(
        default=None, description="First late block; default: the pair's default boundary."
    )
    readouts: list[Readout] = Field(default_factory=lambda: ["it"], min_length=1, max_length=3)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: Seed = 23
    controls: list[Control] = Field(default_factory=list, max_length=len(CONTROLS), description=CONTROLS_HELP)
    control_options: ControlOptions = Field(default_factory=ControlOptions)

    @model_validator(mode="after")
    def _checks(self) -> CrosspatchSpec:
        _unique_controls(self.controls)
        if len(set(self.readouts)) != len(self.readouts):
            raise ValueError("readouts must be unique")
        if isinstance(self.boundary, list) and not 1 <= len(self.boundary) <= 256:
            raise ValueError("a boundary list needs 1..256 entries")
        return self


class MediationOptions(_Spec):
    """How features are ranked and tested (defaults follow the method)."""

    top_k: int = Field(default=200, ge=1, le=100_000, description="Size of the top feature set.")
    ks: list[int] = Field(
        default_factory=lambda: list(DEFAULT_KS),
        min_length=1,
        max_length=16,
        description="Top-set sizes to test, each <= top_k; default: 25, 50, 100, 200 below top_k, and top_k.",
    )
    ablation: Literal["zero", "pt_value"] = "zero"
    fit_fraction: float = Field(default=0.27, gt=0.0, lt=1.0, description="Share of events used for ranking.")
    split_seed: Seed = 0
    n_random_seeds: int = Field(
        default=5, ge=5, le=20, description="Seeds per control (matched-random sets, same-delta directions)."
    )
    neighbours: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="Matched-random candidates per feature (nearest by rate x |score|).",
    )
    allow_failed_gate: bool = Field(default=False, description="Use a dictionary below the quality gate.")
    handoff: bool = Field(
        default=False,
        description="Also run the handoff chain (method §5.4-5.5): upstream-dependent gate, rescue "
        "dose-response over handoff_alphas and MLP-window grafts, each with controls (about 3x mediation).",
    )
    handoff_alphas: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0],
        min_length=1,
        max_length=16,
        description="Rescue dose-response grid; must include 0 (checked to reproduce the unedited cell).",
    )

    @model_validator(mode="after")
    def _ks(self) -> MediationOptions:
        if "ks" not in self.model_fields_set:
            self.ks = [k for k in DEFAULT_KS if k < self.top_k] + [self.top_k]
        if any(k < 1 for k in self.ks):
            raise ValueError("every k must be >= 1")
        if 0.0 not in self.handoff_alphas or any(not -10.0 <= a <= 10.0 for a in self.handoff_alphas):
            raise ValueError("handoff_alphas must include 0 and lie in [-10, 10]")
        too_big = [k for k in self.ks if k > self.top_k]
        if too_big:
            raise ValueError(f"ks {too_big} exceed top_k={self.top_k}; every k must be <= top_k")
        return self


class DictionaryOptions(_Spec):
    """The dictionary a pipeline trains per pair: by default the method's paired PT/IT BatchTopK crosscoder
    on the final MLP output (section 5.1); SAEs and transcoders on IT's are options."""

    architecture: Literal[
        "topk",
        "batchtopk",
        "jumprelu",
        "standard",
        "batchtopk_transcoder",
        "batchtopk_skip_transcoder",
        "batchtopk_crosscoder",
    ] = "batchtopk_crosscoder"
    layer: int | None = Field(default=None, ge=0, le=1024, description="Default: the last layer.")
    width: int | None = Field(
        default=None, ge=1, le=1 << 20, description="Default: 32 x d_model (crosscoders, method), else 8 x."
    )
    k: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="Active latents per token (batchtopk may be fractional). Default: crosscoders the "
        "method's 64 at d_model 4096 scaled to d_model (at least 1); other architectures 8.",
    )
    training_tokens: int | None = Field(default=None, ge=1, le=10**11, description="Default: 30 epochs.")
    continuation_tokens: int = Field(
        default=64, ge=0, le=4096, description="PT-greedy tokens after each prompt."
    )
    batch_size: int = Field(default=256, ge=8, le=65_536)
    lr: float = Field(default=3e-4, gt=0, le=1.0)
    seed: Seed = 0
    training_prompts: Literal["mediation_fit", "all"] = Field(
        default="mediation_fit",
        description="mediation_fit: train only on prompts outside the mediation test split (method 5.1); "
        "all: every prompt (they are a separate corpus, not the mediation prompts).",
    )
    min_heldout_tokens: int = Field(
        default=10_000, ge=1, le=10**9, description="Quality gate: fewer held-out tokens fail the gate."
    )
    max_alive_fraction: float = Field(
        default=0.20, ge=0.01, le=1.0, description="Quality gate: alive fraction must lie in [0.01, this]."
    )

    balance_branches: bool = Field(
        default=True,
        description="Crosscoders: train on each branch scaled to mean norm sqrt(d_model) (folded into the "
        "saved weights), so a branch with small MLP outputs still counts in the summed MSE.",
    )

    @model_validator(mode="after")
    def _k_width(self) -> DictionaryOptions:
        if self.k is None and not self.architecture.endswith("crosscoder"):
            self.k = 8
        if self.k is not None and self.width is not None and self.k > self.width:
            raise ValueError(f"k={self.k} exceeds width {self.width}")
        return self


class TrainDictionarySpec(_PromptsSpec):
    """Train a sparse dictionary on one pair's MLP activations (prompts + PT-greedy continuations) and
    register it with its quality gate."""

    kind: Literal["train_dictionary"] = "train_dictionary"
    pair_id: Name
    model_role: Literal["PT", "IT", "paired"] = Field(
        default="IT", description="Whose activations; crosscoders are always paired."
    )
    dictionary: DictionaryOptions = Field(default_factory=DictionaryOptions)
    # the mediation split the dictionary must not train on (dictionary.training_prompts="mediation_fit"):
    # what a mediation job with these settings on the same prompts would test
    max_new_tokens: int = Field(default=32, ge=1, le=1024, description="Divergence budget of that mediation.")
    fit_fraction: float = Field(default=0.27, gt=0.0, lt=1.0, description="Its fit fraction.")
    split_seed: int = Field(default=0, ge=0, description="Its split seed.")


class LoadDictionarySpec(_Spec):
    """Register a dictionary: a sae_lens-format directory under the dictionary roots (`source: "path"`), or
    a pretrained SAE by sae_lens release id from the worker's local Hugging Face cache (`source:
    "sae_lens"`, `release`, `sae_id`; allow-listed by `CROSSPATCH_PRETRAINED_DICTIONARIES`). Its gate
    status comes from its crosspatch metadata; dictionaries without one are 'not_evaluated'."""

    kind: Literal["load_dictionary"] = "load_dictionary"
    pair_id: Name
    source: Literal["path", "sae_lens"] = "path"
    path: str | None = Field(default=None, min_length=1, max_length=1024)
    release: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[^/\s]+$")
    sae_id: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^\S+$")
    model_role: Literal["PT", "IT", "paired"] = "IT"

    @model_validator(mode="after")
    def _one_source(self) -> LoadDictionarySpec:
        if self.source == "path" and (self.path is None or self.release or self.sae_id):
            raise ValueError("source 'path' needs 'path' (and no 'release' / 'sae_id')")
        if self.source == "sae_lens" and (self.path is not None or not self.release or not self.sae_id):
            raise ValueError("source 'sae_lens' needs 'release' and 'sae_id' (and no 'path')")
        return self


class MediationSpec(_PromptsSpec):
    """Rank, ablate and rescue a registered dictionary's features on the pair's divergence events."""

    kind: Literal["mediation"] = "mediation"
    pair_id: Name
    dictionary_id: Name
    chat_template: bool = Field(default=False, description=CHAT_TEMPLATE_HELP)
    boundary: Boundary | None = None
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    mediation: MediationOptions = Field(default_factory=MediationOptions)


class ForcedTokensSpec(DivergenceSpec):
    """Divergence, then forced-token scoring (method §6.1): force t_IT, t_PT, a rank-matched and a
    class-matched token, continue greedily with IT, score the suffix with deterministic validators."""

    kind: Literal["forced_tokens"] = "forced_tokens"  # type: ignore[assignment]
    branches: list[Literal["it", "pt", "rank_matched", "class_matched"]] = Field(
        default_factory=lambda: ["it", "pt", "rank_matched", "class_matched"], min_length=2, max_length=4
    )
    budgets: dict[str, int] | None = Field(
        default=None,
        description="max_new_tokens per category (overrides the method's CONTENT-REASON 256, SAFETY 128, "
        "GOV-CONV 128, GOV-FORMAT 96; key '*' for every other category, default 128).",
    )
    n_resamples: int = Field(default=1000, ge=10, le=100_000)
    seed: int = Field(default=23, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> ForcedTokensSpec:
        if (
            "it" not in self.branches
            or "pt" not in self.branches
            or len(set(self.branches)) != len(self.branches)
        ):
            raise ValueError("branches must be unique and include 'it' and 'pt'")
        if self.budgets and any(not 1 <= v <= 4096 for v in self.budgets.values()):
            raise ValueError("every budget must lie in 1..4096")
        return self


class ContinuationSpec(DivergenceSpec):
    """Divergence, then constrained continuation (method §6.2): C_N per N, tail-only, and its controls."""

    kind: Literal["continuation"] = "continuation"  # type: ignore[assignment]
    ns: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8], min_length=1, max_length=16)
    boundary: int | None = Field(default=None, ge=0, description="First late block; default round(0.6 L).")
    readout: Readout = "it"
    variants: list[Literal["native", "same_forced", "shuffled_tail"]] = Field(
        default_factory=lambda: ["native", "same_forced", "shuffled_tail"], min_length=1, max_length=3
    )
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: int = Field(default=23, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> ContinuationSpec:
        if any(not 0 <= n <= 256 for n in self.ns) or len(set(self.ns)) != len(self.ns):
            raise ValueError("ns must be unique tail lengths in 0..256")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must be unique")
        return self


class LoraOptions(_Spec):
    """LoRA continued-pretraining settings; defaults are the method's (§4.2)."""

    rank: int = Field(default=32, ge=1, le=1024)
    alpha: int = Field(default=64, ge=1, le=4096)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        max_length=32,
    )
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_fraction: float = Field(default=0.03, ge=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, gt=0.0)
    train_tokens: int = Field(default=20_000_000, ge=1, le=10_000_000_000)
    seq_len: int = Field(default=4096, ge=2, le=131_072)
    batch_size: int = Field(default=8, ge=1, le=1024)
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=200, ge=0, description="Steps between checkpoints (0: none).")
    min_nll_improvement: float = Field(
        default=0.02, ge=0.0, lt=1.0, description="Relative held-out domain-NLL drop the control must reach."
    )
    merge_tolerance: float = Field(default=1e-4, gt=0.0)
    min_distinct: float = Field(default=0.1, ge=0.0, le=1.0)
    max_token_share: float = Field(default=0.5, gt=0.0, le=1.0)


class LoraControlSpec(_PromptsSpec):
    """A domain-training control (method §4.2): LoRA on the pair's PT with a domain corpus, merge, verify
    (domain NLL, merge equivalence, generation health), then the 2x2 of PT vs the control on the prompts.
    A control that fails verification is reported not valid, with no interaction."""

    kind: Literal["lora_control"] = "lora_control"
    pair_id: Name
    corpus: list[str] = Field(min_length=2, max_length=100_000, description="Domain texts (inline).")
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="Last share of texts held out.")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    boundary: int | None = Field(default=None, ge=0)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: int = Field(default=23, ge=0)


class PipelineSpec(_PromptsSpec):
    """Divergence -> 2x2 cross-patch -> dictionary -> mediation, for one pair or several (families)."""

    kind: Literal["pipeline"] = "pipeline"
    pair_ids: list[Name] = Field(min_length=1, max_length=32)
    chat_template: bool = Field(default=False, description=CHAT_TEMPLATE_HELP)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    chunk_size: int = Field(default=64, ge=1, le=10_000, description="Prompts per checkpoint part.")
    boundary: Boundary | list[Boundary] | Literal["sweep"] | None = Field(
        default=None,
        description="2x2 boundary, list or sweep (default: each pair's round(0.6 L)); mediation runs at "
        "each pair's headline boundary (the default for a sweep).",
    )
    readouts: list[Readout] = Field(default_factory=lambda: ["it"], min_length=1, max_length=3)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: Seed = 23
    dictionary: DictionaryOptions = Field(default_factory=DictionaryOptions)
    mediation: MediationOptions = Field(default_factory=MediationOptions)
    figures: bool = Field(default=True, description="Write PNG figures with the results.")
    forced_tokens: bool = Field(default=False, description="Also run forced-token scoring per pair (§6.1).")
    continuation: bool = Field(
        default=False, description="Also run constrained continuation per pair (§6.2)."
    )
    controls: list[Control] = Field(default_factory=list, max_length=len(CONTROLS), description=CONTROLS_HELP)
    control_options: ControlOptions = Field(default_factory=ControlOptions)

    @model_validator(mode="after")
    def _checks(self) -> PipelineSpec:
        _unique_controls(self.controls)
        if isinstance(self.boundary, list) and not 1 <= len(self.boundary) <= 256:
            raise ValueError("a boundary list needs 1..256 entries")
        if isinstance(self.boundary, int) and self.boundary < 0:
            raise ValueError("boundary must be >= 0")
        return self


class StageIn(DescendantIn):
    """One descendant of the support pair's base: a registered pair (its IT model) or a model path."""

    name: Name

    def label(self) -> str:
        return f"stage {self.name!r}"


class LineageSpec(_PromptsSpec):
    """Fixed-support lineage sweep (method 4.7): the support pair's (base -> final) first divergences and
    labels, every stage scored as "IT" against the base in the 2x2; one `lineage` row per stage, and
    recipe contrasts between stages (interaction A - B per prompt, sign-flip null)."""

    kind: Literal["lineage"] = "lineage"
    pair_id: Name = Field(description="The support pair: base (PT) -> final descendant (IT).")
    stages: list[StageIn] = Field(min_length=1, max_length=32)
    reference: Name | None = Field(default=None, description="Stage the shares refer to (default: the last).")
    contrasts: list[tuple[Name, Name]] = Field(
        default_factory=list, max_length=32, description="(stage_a, stage_b) pairs: interaction A - B."
    )
    chat_template: bool = Field(default=False, description=CHAT_TEMPLATE_HELP)
    boundary: int | None = Field(default=None, ge=0, description="One boundary (default: the pair's).")
    readout: Readout = "it"
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    n_permutations: int = Field(default=20000, ge=99, le=1_000_000)
    seed: int = Field(default=23, ge=0)
    figures: bool = Field(default=True, description="Write PNG figures with the results.")

    @model_validator(mode="after")
    def _checks(self) -> LineageSpec:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stage names must be unique")
        for name in [self.reference, *(n for c in self.contrasts for n in c)]:
            if name is not None and name not in names:
                raise ValueError(f"{name!r} is not one of the stages {names}")
        if any(a == b for a, b in self.contrasts):
            raise ValueError("a contrast needs two different stages")
        return self


JobSpec = Annotated[
    DivergenceSpec
    | CrosspatchSpec
    | TrainDictionarySpec
    | LoadDictionarySpec
    | MediationSpec
    | PipelineSpec
    | ForcedTokensSpec
    | ContinuationSpec
    | LoraControlSpec
    | LineageSpec,
    Field(discriminator="kind"),
]
JOB_SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)

JobStatus = Literal["submitted", "queued", "running", "ingesting", "succeeded", "failed", "cancelled"]


class JobCreate(BaseModel):
    """What a researcher submits."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "spec": {
                        "kind": "crosspatch",
                        "pair_id": "tiny-llama",
                        "prompts": [{"id": "p1", "text": "The capital of France is"}],
                        "boundary": "sweep",
                    },
                    "priority": 0,
                }
            ]
        },
    )

    spec: JobSpec
    priority: int = Field(
        default=0,
        ge=-100,
        le=100,
        description="Orders only your own jobs (fair share between researchers comes first); researchers "
        "may set -10..0, admins -100..100.",
    )
    share: Literal["lab", "owner"] = Field(
        default="lab", description="Who may read this job's results: the whole lab, or only you (and admins)."
    )


class JobPublic(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner: str
    kind: str
    status: JobStatus
    priority: int
    pair_id: str | None
    spec: dict[str, Any]
    progress: dict[str, Any]
    attempts: int
    losses: int = Field(description="Times a worker was lost under this job (counted apart from errors).")
    share: Literal["lab", "owner"] = Field(description="Who may read the job's results.")
    worker_id: str | None
    error: str | None
    estimated_memory_bytes: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobStatusPublic(BaseModel):
    """A job's state without its spec: what pollers need, cheap to serve however large the spec is."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b8c1e-7d4a-4e0b-9a51-2c6f0e8d9b77",
                    "status": "running",
                    "progress": {"fraction": 0.4, "message": "trained_llama: 2x2 chunk 2/5"},
                    "attempts": 1,
                    "error": None,
                    "finished_at": None,
                }
            ]
        },
    )

    id: uuid.UUID
    status: JobStatus
    progress: dict[str, Any]
    attempts: int
    error: str | None
    finished_at: datetime | None


class JobAttemptPublic(BaseModel):
    """One claim of a job: its worker, when, and how it ended (`None` while it runs)."""

    model_config = ConfigDict(from_attributes=True)

    attempt: int
    worker_id: str
    claimed_at: datetime
    ended_at: datetime | None
    outcome: Literal["finished", "failed", "released", "worker_lost", "cancelled"] | None
    detail: str | None


class JobAttemptsPublic(BaseModel):
    data: list[JobAttemptPublic]
    count: int


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class JobLogPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    created_at: datetime
    level: str
    message: str


class JobLogsPublic(BaseModel):
    data: list[JobLogPublic]
    count: int


def job_kinds() -> list[str]:
    """Every job kind the spec union accepts; each has a worker handler (tests/app/test_job_kinds.py)."""
    union = typing.get_args(JobSpec)[0]  # the discriminated union inside Annotated
    return sorted(spec.model_fields["kind"].default for spec in typing.get_args(union))
