"""Training configs: one dataclass per architecture, registered in `CONFIGS` (duplicates raise).

`make_config(architecture, **kwargs)` builds one; `config_from_dict` dispatches on "architecture" and rejects
unknown keys in configs crosspatch wrote (warns on foreign ones). The runner is `saes.train`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig

from crosspatch.saes import arch
from crosspatch.saes.cache import HOOK_POINTS, ROLES, ActivationSource
from crosspatch.saes.errors import DictionaryConfigError

WRITTEN_BY = "crosspatch"
LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")


# ---- configs ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainConfig:
    """Fields every dictionary kind shares. `training_tokens` counts activation rows seen."""

    KIND: ClassVar[str] = ""

    layer: int
    hook_point: str = "mlp_out"
    model_role: str = "it"
    width: int = 1024
    training_tokens: int = 1_000_000
    batch_size: int = 512
    lr: float = 3e-4
    lr_scheduler: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    seed: int = 0
    heldout_fraction: float = 0.1
    dead_feature_window: int = 1000
    feature_sampling_window: int = 2000
    normalize_activations: str = "none"
    decoder_init_norm: float | None = 0.1
    device: str = "cpu"

    @classmethod
    def architecture(cls) -> str:
        """The sae_lens architecture name; every registered subclass defines it."""
        raise TypeError(f"{cls.__name__} is the abstract base config; use make_config(architecture, ...)")

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def total_steps(self) -> int:
        return -(-self.training_tokens // self.batch_size)  # the loop runs while samples < tokens

    @property
    def k_value(self) -> float | None:
        return getattr(self, "k", None)

    def validate(self) -> None:
        """Raise `DictionaryConfigError` naming the bad field and the valid options."""
        if self.hook_point not in HOOK_POINTS:
            raise DictionaryConfigError(
                f"unknown hook point {self.hook_point!r}; valid: {', '.join(HOOK_POINTS)}"
            )
        roles = ("paired",) if self.KIND == "crosscoder" else ROLES
        if self.model_role not in roles:
            raise DictionaryConfigError(
                f"model_role {self.model_role!r} invalid for a {self.KIND}; valid: {', '.join(roles)}"
            )
        if self.width < 1:
            raise DictionaryConfigError(f"width must be >= 1, got {self.width}")
        k = self.k_value
        if k is not None and not 0 < k <= self.width:
            raise DictionaryConfigError(f"k={k} must be in (0, width={self.width}]")
        if self.batch_size < 1 or self.training_tokens < self.batch_size:
            raise DictionaryConfigError(
                f"training_tokens ({self.training_tokens}) must be >= batch_size ({self.batch_size}) >= 1"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise DictionaryConfigError(
                f"unknown lr_scheduler {self.lr_scheduler!r}; valid: {', '.join(LR_SCHEDULERS)}"
            )
        if not 0 < self.heldout_fraction < 1:
            raise DictionaryConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def data_keys(self, source: ActivationSource) -> list[str]:
        """Cache tensor names this dictionary trains on, in batch order (validated against the cache)."""
        return [source.check_key(self.model_role, self.layer, self.hook_point)]

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        """The sae_lens training config for this architecture; every registered subclass defines it."""
        raise TypeError(
            f"{type(self).__name__} is the abstract base config; use make_config(architecture, ...)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(architecture=self.architecture(), kind=self.KIND, written_by=WRITTEN_BY)
        return d

    def _common(self, d_model: int) -> dict[str, Any]:
        return dict(
            d_in=d_model,
            d_sae=self.width,
            device=self.device,
            decoder_init_norm=self.decoder_init_norm,
            normalize_activations=self.normalize_activations,
        )


CONFIGS: dict[str, type[TrainConfig]] = {}


def register_config(cls: type[TrainConfig]) -> type[TrainConfig]:
    """Add a config class under its architecture name; a second registration of a name raises."""
    name = cls.architecture()
    if name in CONFIGS:
        raise ValueError(f"architecture {name!r} is already registered ({CONFIGS[name].__name__})")
    CONFIGS[name] = cls
    return cls


def make_config(architecture: str, **kwargs: Any) -> TrainConfig:
    """A config of `architecture` with `kwargs` over the defaults (validated)."""
    if architecture not in CONFIGS:
        raise DictionaryConfigError(
            f"unknown architecture {architecture!r}; valid: {', '.join(sorted(CONFIGS))}"
        )
    cls = CONFIGS[architecture]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise DictionaryConfigError(
            f"unknown option(s) {unknown} for {architecture}; valid: {', '.join(sorted(names))}"
        )
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise DictionaryConfigError(f"bad {architecture} config: {e}") from None
    cfg.validate()
    return cfg


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from `to_dict` output; unknown keys raise if crosspatch wrote it, else warn."""
    d = dict(d)
    arch_name = d.pop("architecture", None)
    if arch_name not in CONFIGS:
        raise DictionaryConfigError(
            f"unknown architecture {arch_name!r}; valid: {', '.join(sorted(CONFIGS))}"
        )
    ours = d.pop("written_by", None) == WRITTEN_BY
    d.pop("kind", None)
    names = {f.name for f in dataclasses.fields(CONFIGS[arch_name])}
    unknown = sorted(set(d) - names)
    if unknown:
        if ours:
            raise DictionaryConfigError(f"config for {arch_name} has unknown key(s) {unknown}")
        warnings.warn(f"ignoring unknown config key(s) {unknown} for {arch_name}", stacklevel=2)
        d = {k: v for k, v in d.items() if k in names}
    return make_config(arch_name, **d)


# -- SAEs: sae_lens's own training classes ---------------------------------------------------------------
@dataclass(kw_only=True)
class BatchTopKSAETrain(TrainConfig):
    """sae_lens BatchTopK SAE (saved as JumpReLU)."""

    KIND: ClassVar[str] = "sae"
    k: float = 32
    aux_loss_coefficient: float = 1.0
    topk_threshold_lr: float = 0.01

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk"

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        return get_sae_training_class("batchtopk")[1](
            **self._common(d_model),
            k=self.k,
            aux_loss_coefficient=self.aux_loss_coefficient,
            topk_threshold_lr=self.topk_threshold_lr,
        )


@dataclass(kw_only=True)
class TopKSAETrain(TrainConfig):
    """sae_lens TopK SAE."""

    KIND: ClassVar[str] = "sae"
    k: int = 32
    aux_loss_coefficient: float = 1.0

    @classmethod
    def architecture(cls) -> str:
        return "topk"

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        return get_sae_training_class("topk")[1](
            **self._common(d_model), k=int(self.k), aux_loss_coefficient=self.aux_loss_coefficient
        )


@dataclass(kw_only=True)
class JumpReLUSAETrain(TrainConfig):
    """sae_lens JumpReLU SAE (L0 penalty with a straight-through threshold)."""

    KIND: ClassVar[str] = "sae"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    pre_act_loss_coefficient: float | None = None
    target_l0: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu"

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        return get_sae_training_class("jumprelu")[1](
            **self._common(d_model),
            l0_coefficient=self.l0_coefficient,
            l0_warm_up_steps=self.l0_warm_up_steps,
            jumprelu_init_threshold=self.jumprelu_init_threshold,
            jumprelu_bandwidth=self.jumprelu_bandwidth,
            jumprelu_sparsity_loss_mode=self.jumprelu_sparsity_loss_mode,
            pre_act_loss_coefficient=self.pre_act_loss_coefficient,
            target_l0=self.target_l0,
        )


@dataclass(kw_only=True)
class StandardSAETrain(TrainConfig):
    """sae_lens standard (ReLU + L1) SAE."""

    KIND: ClassVar[str] = "sae"
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    lp_norm: float = 1.0

    @classmethod
    def architecture(cls) -> str:
        return "standard"

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        return get_sae_training_class("standard")[1](
            **self._common(d_model),
            l1_coefficient=self.l1_coefficient,
            l1_warm_up_steps=self.l1_warm_up_steps,
            lp_norm=self.lp_norm,
        )


# -- transcoders and crosscoders: saes.arch ---------------------------------------------------------------
@dataclass(kw_only=True)
class TranscoderTrain(TrainConfig):
    """BatchTopK transcoder, MLP input -> MLP output (saved as sae_lens `jumprelu_transcoder`)."""

    KIND: ClassVar[str] = "transcoder"
    k: float = 32
    aux_loss_coefficient: float = 1 / 32
    threshold_beta: float = 0.99

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"

    def validate(self) -> None:
        super().validate()
        if self.hook_point != "mlp_out":
            raise DictionaryConfigError(
                "a transcoder reads mlp_in and writes mlp_out; hook_point must be mlp_out"
            )

    def data_keys(self, source: ActivationSource) -> list[str]:
        return [
            source.check_key(self.model_role, self.layer, "mlp_in"),
            source.check_key(self.model_role, self.layer, "mlp_out"),
        ]

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        cls = get_sae_training_class(self.architecture())[1]
        return cls(
            **self._common(d_model),
            d_out=d_model,
            k=self.k,
            aux_loss_coefficient=self.aux_loss_coefficient,
            threshold_beta=self.threshold_beta,
        )


@dataclass(kw_only=True)
class SkipTranscoderTrain(TranscoderTrain):
    """BatchTopK skip transcoder (saved as sae_lens `jumprelu_skip_transcoder`)."""

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_skip_transcoder"


@dataclass(kw_only=True)
class CrosscoderTrain(TrainConfig):
    """Paired PT/IT BatchTopK crosscoder (method §5.1), on the same hook point of both models."""

    KIND: ClassVar[str] = "crosscoder"
    model_role: str = "paired"
    branches: list[str] = field(default_factory=lambda: ["pt", "it"])
    k: float = 64
    k_start: float | None = None
    k_anneal_steps: int = 0
    auxk: int = 1024
    aux_loss_coefficient: float = 1 / 32
    threshold_beta: float = 0.999
    threshold_start_step: int = 0
    mean_estimate_batches: int = 16
    # scale each branch to mean norm sqrt(d) for training (folded into the saved weights), so a branch with
    # small activations (a model whose MLP barely writes) still counts in the summed MSE
    balance_branches: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_crosscoder"

    def validate(self) -> None:
        super().validate()
        bad = [b for b in self.branches if b not in ("pt", "it")]
        if bad or len(self.branches) < 2:
            raise DictionaryConfigError(f"crosscoder branches {self.branches} invalid; use two of pt, it")
        if self.k_start is not None and not 0 < self.k_start <= self.width:
            raise DictionaryConfigError(f"k_start={self.k_start} must be in (0, width={self.width}]")

    def data_keys(self, source: ActivationSource) -> list[str]:
        return [source.check_key(b, self.layer, self.hook_point) for b in self.branches]

    def sae_lens_config(self, d_model: int) -> TrainingSAEConfig:
        return arch.BatchTopKCrosscoderTrainingSAEConfig(
            **self._common(d_model),
            n_branches=len(self.branches),
            branches=list(self.branches),
            k=self.k,
            k_start=self.k_start,
            k_anneal_steps=self.k_anneal_steps,
            auxk=self.auxk,
            aux_loss_coefficient=self.aux_loss_coefficient,
            threshold_beta=self.threshold_beta,
            threshold_start_step=self.threshold_start_step,
            balance_branches=self.balance_branches,
        )


for _cls in (
    BatchTopKSAETrain,
    TopKSAETrain,
    JumpReLUSAETrain,
    StandardSAETrain,
    TranscoderTrain,
    SkipTranscoderTrain,
    CrosscoderTrain,
):
    register_config(_cls)
