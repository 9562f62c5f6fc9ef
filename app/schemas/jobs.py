"""Job specs (a discriminated union on `kind`) and the job resource's schema family."""

from __future__ import annotations

import typing
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

Readout = Literal["it", "pt", "own"]
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


class CrosspatchSpec(DivergenceSpec):
    """Divergence, then the 2x2 cross-patch at one boundary, a list, or a sweep; then summaries."""

    kind: Literal["crosspatch"] = "crosspatch"  # type: ignore[assignment]
    boundary: int | list[int] | Literal["sweep"] | None = Field(
        default=None, description="First late block; default: the pair's default boundary."
    )
    readouts: list[Readout] = Field(default_factory=lambda: ["it"], min_length=1, max_length=3)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: int = Field(default=23, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> CrosspatchSpec:
        if len(set(self.readouts)) != len(self.readouts):
            raise ValueError("readouts must be unique")
        if isinstance(self.boundary, list) and not 1 <= len(self.boundary) <= 256:
            raise ValueError("a boundary list needs 1..256 entries")
        return self


class MediationOptions(_Spec):
    """How features are ranked and tested (defaults follow the method)."""

    top_k: int = Field(default=200, ge=1, le=100_000, description="Size of the top feature set.")
    ks: list[int] = Field(default_factory=lambda: [25, 50, 100, 200], min_length=1, max_length=16)
    ablation: Literal["zero", "pt_value"] = "zero"
    fit_fraction: float = Field(default=0.27, gt=0.0, lt=1.0, description="Share of events used for ranking.")
    split_seed: int = Field(default=0, ge=0)
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

    @model_validator(mode="after")
    def _ks(self) -> MediationOptions:
        if any(k < 1 for k in self.ks):
            raise ValueError("every k must be >= 1")
        return self


class DictionaryOptions(_Spec):
    """The dictionary a pipeline trains per pair on IT's final MLP output (or PT+IT for crosscoders)."""

    architecture: Literal[
        "topk",
        "batchtopk",
        "jumprelu",
        "standard",
        "batchtopk_transcoder",
        "batchtopk_skip_transcoder",
        "batchtopk_crosscoder",
    ] = "topk"
    layer: int | None = Field(default=None, ge=0, le=1024, description="Default: the last layer.")
    width: int | None = Field(default=None, ge=1, le=1 << 20, description="Default: 8 x d_model.")
    k: float | None = Field(
        default=8, gt=0, le=4096, description="Active latents per token (batchtopk may be fractional)."
    )
    training_tokens: int | None = Field(default=None, ge=1, le=10**11, description="Default: 30 epochs.")
    continuation_tokens: int = Field(
        default=64, ge=0, le=4096, description="PT-greedy tokens after each prompt."
    )
    batch_size: int = Field(default=256, ge=8, le=65_536)
    lr: float = Field(default=3e-4, gt=0, le=1.0)
    seed: int = Field(default=0, ge=0)
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

    @model_validator(mode="after")
    def _k_width(self) -> DictionaryOptions:
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
    boundary: int | None = Field(default=None, ge=0)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    mediation: MediationOptions = Field(default_factory=MediationOptions)


class PipelineSpec(_PromptsSpec):
    """Divergence -> 2x2 cross-patch -> dictionary -> mediation, for one pair or several (families)."""

    kind: Literal["pipeline"] = "pipeline"
    pair_ids: list[Name] = Field(min_length=1, max_length=32)
    chat_template: bool = Field(default=False, description=CHAT_TEMPLATE_HELP)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    batch_size: int = Field(default=16, ge=1, le=512)
    chunk_size: int = Field(default=64, ge=1, le=10_000, description="Prompts per checkpoint part.")
    boundary: int | list[int] | Literal["sweep"] | None = Field(
        default=None,
        description="2x2 boundary, list or sweep (default: each pair's round(0.6 L)); mediation runs at "
        "each pair's headline boundary (the default for a sweep).",
    )
    readouts: list[Readout] = Field(default_factory=lambda: ["it"], min_length=1, max_length=3)
    n_resamples: int = Field(default=2000, ge=10, le=100_000)
    seed: int = Field(default=23, ge=0)
    dictionary: DictionaryOptions = Field(default_factory=DictionaryOptions)
    mediation: MediationOptions = Field(default_factory=MediationOptions)
    figures: bool = Field(default=True, description="Write PNG figures with the results.")

    @model_validator(mode="after")
    def _checks(self) -> PipelineSpec:
        if isinstance(self.boundary, list) and not 1 <= len(self.boundary) <= 256:
            raise ValueError("a boundary list needs 1..256 entries")
        if isinstance(self.boundary, int) and self.boundary < 0:
            raise ValueError("boundary must be >= 0")
        return self


JobSpec = Annotated[
    DivergenceSpec | CrosspatchSpec | TrainDictionarySpec | LoadDictionarySpec | MediationSpec | PipelineSpec,
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
    priority: int = Field(default=0, ge=-100, le=100)


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
