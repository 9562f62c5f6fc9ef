"""Dictionary architectures sae_lens does not train: BatchTopK transcoders and paired PT/IT crosscoders.

They follow sae_lens's conventions so its own `SAETrainer` trains them and its save format stores them:
a `TrainingSAE` subclass with a `TrainingSAEConfig`, `training_forward_pass` returning a `TrainStepOutput`,
`save_inference_model` writing `cfg.json` + `sae_weights.safetensors`. Like sae_lens's BatchTopK SAE
(saved as JumpReLU), they train with BatchTopK on decoder-norm-scaled scores and save an inference form with
the norms folded in and a JumpReLU threshold (the EMA of the BatchTopK cutoff).

- transcoders map MLP input -> MLP output; the trainer's batch is `[B, d_in + d_out]` (input ‖ target).
  They save as sae_lens's own `jumprelu_transcoder` / `jumprelu_skip_transcoder`, so
  `sae_lens.SAE.load_from_disk` opens them without crosspatch.
- crosscoders (method §5.1): shared latents, per-branch encoder `W_enc[branch, d, F]` and decoder
  `W_dec[F, branch, d]`, input-mean centering, BatchTopK on `relu(pre) * sum_b ||W_dec[f, b]||`, k annealed
  from `k_start`, AuxK on dead latents, EMA threshold for inference. The batch is `[B, n_branches * d]`.
  sae_lens has no crosscoder class; `Crosscoder` below is registered with sae_lens under "crosscoder"
  when crosspatch is imported, so `SAE.load_from_disk` opens it then. Without crosspatch, use the
  per-branch copies saved beside it (`branches/pt/`, `branches/it/`: plain JumpReLU SAEs; saes/export.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import calculate_topk_aux_acts
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig, JumpReLUTranscoderConfig
from torch import nn


def _ema_threshold(
    threshold: torch.Tensor, cutoff: torch.Tensor, beta: float, step: int, start: int
) -> torch.Tensor:
    """EMA of the BatchTopK cutoff (β, from `start`); the first value initialises it."""
    if step < start:
        return threshold
    cutoff = cutoff.to(threshold.dtype)
    return torch.where(threshold == 0, cutoff, beta * threshold + (1 - beta) * cutoff)


def _batch_cutoff(acts: torch.Tensor) -> torch.Tensor | None:
    positive = acts[acts > 0]
    return positive.min() if positive.numel() else None


def _finish_step(
    sae: Any,
    step_input: Any,
    sae_in: torch.Tensor,
    out: torch.Tensor,
    acts: torch.Tensor,
    scores: torch.Tensor,
    losses: dict[str, torch.Tensor],
) -> TrainStepOutput:
    """Shared tail of a BatchTopK training step: update the EMA inference threshold, package the output."""
    with torch.no_grad():
        cutoff = _batch_cutoff(acts)
        if cutoff is not None:
            sae.topk_threshold = _ema_threshold(
                sae.topk_threshold,
                cutoff,
                sae.cfg.threshold_beta,
                step_input.n_training_steps,
                sae.cfg.threshold_start_step,
            )
    return TrainStepOutput(
        sae_in=sae_in,
        sae_out=out,
        feature_acts=acts,
        hidden_pre=scores,
        loss=sum(losses.values()),
        losses=losses,  # type: ignore[arg-type]
    )


# ---- transcoders ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BatchTopKTranscoderTrainingSAEConfig(TrainingSAEConfig):
    """Training config of a BatchTopK transcoder (d_in -> d_out); saved as a JumpReLU transcoder."""

    d_out: int
    k: float = 32
    apply_b_dec_to_input: bool = False
    aux_loss_coefficient: float = 1 / 32
    threshold_beta: float = 0.99
    threshold_start_step: int = 0

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUTranscoderConfig

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input is not supported for transcoders")
        super().__post_init__()


@dataclass(kw_only=True)
class BatchTopKSkipTranscoderTrainingSAEConfig(BatchTopKTranscoderTrainingSAEConfig):
    """As `BatchTopKTranscoderTrainingSAEConfig`, plus a learned linear skip `x_in @ W_skip.T`."""

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_skip_transcoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSkipTranscoderConfig


class BatchTopKTranscoderTrainingSAE(TrainingSAE[BatchTopKTranscoderTrainingSAEConfig]):
    """Transcoder trained with BatchTopK; `sae_in` of a train step is `[B, d_in + d_out]`."""

    W_enc: nn.Parameter  # [d_in, d_sae]
    b_enc: nn.Parameter  # [d_sae]
    W_dec: nn.Parameter  # [d_sae, d_out]
    b_dec: nn.Parameter  # [d_out]
    topk_threshold: torch.Tensor

    def __init__(self, cfg: BatchTopKTranscoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "topk_threshold", torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device)
        )

    @property
    def has_skip(self) -> bool:
        return self.cfg.architecture() == "batchtopk_skip_transcoder"

    def initialize_weights(self) -> None:
        c, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        w_dec = torch.empty(c.d_sae, c.d_out, **kw)
        nn.init.kaiming_uniform_(w_dec)
        if c.decoder_init_norm is not None:
            w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * c.decoder_init_norm
        self.W_dec = nn.Parameter(w_dec)
        if c.d_in == c.d_out:
            self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        else:
            w_enc = torch.empty(c.d_in, c.d_sae, **kw)
            nn.init.kaiming_uniform_(w_enc)
            self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(c.d_out, **kw))
        if self.cfg.architecture() == "batchtopk_skip_transcoder":
            self.W_skip = nn.Parameter(torch.zeros(c.d_out, c.d_in, **kw))

    def get_activation_fn(self) -> BatchTopK:
        return BatchTopK(self.cfg.k)

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        return self.run_time_activation_norm_fn_in(self.hook_sae_input(sae_in.to(self.dtype)))

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `[B, d_in]` -> (BatchTopK acts on decoder-norm-scaled scores, scores), both `[B, d_sae]`."""
        hidden_pre = self.process_sae_in(x) @ self.W_enc + self.b_enc  # [B, d_sae]
        scores = hidden_pre * self.W_dec.norm(dim=-1)  # [B, d_sae]
        return self.hook_sae_acts_post(self.activation_fn(scores)), scores

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Score-space acts `[B, d_sae]` -> `[B, d_out]` (without the skip term)."""
        return (feature_acts / self.W_dec.norm(dim=-1)) @ self.W_dec + self.b_dec

    def get_coefficients(self) -> dict[str, float]:
        return {}

    def calculate_aux_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        d_in = self.cfg.d_in
        x_in, target = step_input.sae_in[:, :d_in], step_input.sae_in[:, d_in:]  # [B, d_in], [B, d_out]
        acts, scores = self.encode_with_hidden_pre(x_in)
        out = self.decode(acts)  # [B, d_out]
        if self.has_skip:
            out = out + x_in @ self.W_skip.T
        mse = (out - target).pow(2).sum(-1).mean()
        losses = {"mse_loss": mse}
        mask = step_input.dead_neuron_mask
        if mask is not None and (n_dead := int(mask.sum())) > 0:
            k_aux = min(self.cfg.d_out // 2, n_dead)
            aux_acts = calculate_topk_aux_acts(k_aux, scores, mask)  # [B, d_sae]
            recon = (aux_acts / self.W_dec.norm(dim=-1)) @ self.W_dec  # [B, d_out]
            residual = (target - out).detach()
            scale = min(n_dead / max(self.cfg.d_out // 2, 1), 1.0)
            losses["auxiliary_reconstruction_loss"] = (
                self.cfg.aux_loss_coefficient * scale * (recon - residual).pow(2).sum(-1).mean()
            )
        return _finish_step(self, step_input, target, out, acts, scores, losses)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold decoder norms into the encoder and turn the EMA cutoff into a JumpReLU threshold."""
        norms = self.W_dec.norm(dim=-1).detach()  # [d_sae]
        state_dict["W_enc"] = state_dict["W_enc"] * norms
        state_dict["b_enc"] = state_dict["b_enc"] * norms
        state_dict["W_dec"] = state_dict["W_dec"] / norms[:, None]
        state_dict["threshold"] = torch.full_like(
            self.b_enc.detach(), float(state_dict.pop("topk_threshold"))
        )


class BatchTopKSkipTranscoderTrainingSAE(BatchTopKTranscoderTrainingSAE):
    """BatchTopK skip transcoder (saved as sae_lens `jumprelu_skip_transcoder`)."""


# ---- crosscoders ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CrosscoderConfig(SAEConfig):
    """Inference config of a paired crosscoder: d_in is the per-branch width."""

    n_branches: int = 2
    branches: list[str] = field(default_factory=lambda: ["pt", "it"])
    apply_b_dec_to_input: bool = False

    @classmethod
    def architecture(cls) -> str:
        return "crosscoder"


class Crosscoder(SAE[CrosscoderConfig]):
    """Inference crosscoder: `encode` `[..., n_branches, d]` -> `[..., F]`, `decode` back; JumpReLU threshold.

    `encode_branch(x, b)` encodes one model's activations with that branch's encoder only (method §5.1).
    """

    W_enc: nn.Parameter  # [n_branches, d, F]
    b_enc: nn.Parameter  # [F]
    W_dec: nn.Parameter  # [F, n_branches, d]
    b_dec: nn.Parameter  # [n_branches, d]
    threshold: nn.Parameter  # [F]
    input_mean: torch.Tensor  # [n_branches, d]

    def initialize_weights(self) -> None:
        _init_crosscoder(self, decoder_init_norm=None)
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def branch_index(self, branch: str | int) -> int:
        if isinstance(branch, int) and 0 <= branch < self.cfg.n_branches:
            return branch
        if branch in self.cfg.branches:
            return self.cfg.branches.index(branch)  # type: ignore[arg-type]
        raise ValueError(f"unknown branch {branch!r}; valid: {', '.join(self.cfg.branches)}")

    def _jump(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_acts_post(hidden_pre.relu() * (hidden_pre > self.threshold))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., n_branches, d]` -> `[..., F]`."""
        centered = x.to(self.dtype) - self.input_mean
        hidden_pre = torch.einsum("...nd,ndf->...f", centered, self.W_enc) + self.b_enc  # [..., F]
        return self._jump(self.hook_sae_acts_pre(hidden_pre))

    def encode_branch(self, x: torch.Tensor, branch: str | int) -> torch.Tensor:
        """`[..., d]` of one model -> `[..., F]` using that branch's encoder only."""
        b = self.branch_index(branch)
        hidden_pre = (x.to(self.dtype) - self.input_mean[b]) @ self.W_enc[b] + self.b_enc  # [..., F]
        return self._jump(self.hook_sae_acts_pre(hidden_pre))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """`[..., F]` -> `[..., n_branches, d]`."""
        out = torch.einsum("...f,fnd->...nd", feature_acts, self.W_dec) + self.b_dec + self.input_mean
        return self.hook_sae_recons(out)

    def decode_branch(self, feature_acts: torch.Tensor, branch: str | int) -> torch.Tensor:
        """`[..., F]` -> `[..., d]` for one branch."""
        b = self.branch_index(branch)
        return feature_acts @ self.W_dec[:, b] + self.b_dec[b] + self.input_mean[b]


def _init_crosscoder(sae: SAE[Any], decoder_init_norm: float | None) -> None:
    """Same init for every branch: one random direction per latent, W_enc[b] = W_dec[:, b].T."""
    c, kw = sae.cfg, {"dtype": sae.dtype, "device": sae.device}
    base = torch.empty(c.d_sae, c.d_in, **kw)
    nn.init.kaiming_uniform_(base)
    if decoder_init_norm is not None:
        base = base / base.norm(dim=-1, keepdim=True) * decoder_init_norm
    w_dec = base[:, None, :].repeat(1, c.n_branches, 1)  # [F, n_branches, d]
    sae.W_dec = nn.Parameter(w_dec.contiguous())
    sae.W_enc = nn.Parameter(w_dec.permute(1, 2, 0).clone().contiguous())  # [n_branches, d, F]
    sae.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
    sae.b_dec = nn.Parameter(torch.zeros(c.n_branches, c.d_in, **kw))
    sae.register_buffer("input_mean", torch.zeros(c.n_branches, c.d_in, **kw))


@dataclass(kw_only=True)
class BatchTopKCrosscoderTrainingSAEConfig(TrainingSAEConfig):
    """Training config of a paired BatchTopK crosscoder (method §5.1 defaults where they apply)."""

    n_branches: int = 2
    branches: list[str] = field(default_factory=lambda: ["pt", "it"])
    k: float = 64
    k_start: float | None = None  # anneal k linearly from k_start to k over k_anneal_steps
    k_anneal_steps: int = 0
    auxk: int = 1024
    aux_loss_coefficient: float = 1 / 32
    threshold_beta: float = 0.999
    threshold_start_step: int = 0
    apply_b_dec_to_input: bool = False
    balance_branches: bool = False  # train on each branch scaled to mean norm sqrt(d) (folded in at save)

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_crosscoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return CrosscoderConfig

    def k_at(self, step: int) -> float:
        if self.k_start is None or self.k_anneal_steps <= 0 or step >= self.k_anneal_steps:
            return self.k
        return self.k_start + (self.k - self.k_start) * step / self.k_anneal_steps


class BatchTopKCrosscoderTrainingSAE(TrainingSAE[BatchTopKCrosscoderTrainingSAEConfig]):
    """Crosscoder trained with BatchTopK + AuxK by sae_lens's SAETrainer; batch `[B, n_branches * d]`."""

    W_enc: nn.Parameter  # [n_branches, d, F]
    b_enc: nn.Parameter  # [F]
    W_dec: nn.Parameter  # [F, n_branches, d]
    b_dec: nn.Parameter  # [n_branches, d]
    input_mean: torch.Tensor  # [n_branches, d]
    branch_scale: torch.Tensor  # [n_branches]: 1, or sqrt(d) / mean centered norm (balance_branches)
    topk_threshold: torch.Tensor

    def __init__(self, cfg: BatchTopKCrosscoderTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "topk_threshold", torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device)
        )
        self.register_buffer("branch_scale", torch.ones(cfg.n_branches, device=self.W_dec.device))

    def initialize_weights(self) -> None:
        _init_crosscoder(self, self.cfg.decoder_init_norm)

    def dec_norm_sum(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1).sum(-1)  # [F]

    def get_coefficients(self) -> dict[str, float]:
        return {}

    def calculate_aux_loss(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {}

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).reshape(*x.shape[:-1], self.cfg.n_branches, self.cfg.d_in)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n_branches * d]` -> centered, per-branch scaled `[B, n_branches, d]` (the training space)."""
        return (self._split(x) - self.input_mean) * self.branch_scale[:, None].to(self.dtype)

    def encode_with_hidden_pre(
        self, x: torch.Tensor, k: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, n_branches * d]` -> (BatchTopK acts in score space, scores), both `[B, F]`."""
        centered = self._scaled(x)  # [B, n_branches, d]
        hidden_pre = torch.einsum("bnd,ndf->bf", centered, self.W_enc) + self.b_enc  # [B, F]
        scores = hidden_pre.relu() * self.dec_norm_sum()  # [B, F]
        acts = BatchTopK(self.cfg.k if k is None else k)(scores)  # [B, F]
        return self.hook_sae_acts_post(acts), scores

    def _decode_scaled(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Score-space acts `[B, F]` -> the reconstruction in the training space `[B, n_branches, d]`."""
        out = torch.einsum("bf,fnd->bnd", feature_acts / self.dec_norm_sum(), self.W_dec)
        return out + self.b_dec

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Score-space acts `[B, F]` -> `[B, n_branches * d]`."""
        out = self._decode_scaled(feature_acts) / self.branch_scale[:, None].to(self.dtype)
        return (out + self.input_mean).flatten(-2)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in.to(self.dtype)  # [B, n_branches * d]
        acts, scores = self.encode_with_hidden_pre(x, self.cfg.k_at(step_input.n_training_steps))
        scaled = self._decode_scaled(acts)  # [B, n_branches, d]
        out = (scaled / self.branch_scale[:, None].to(self.dtype) + self.input_mean).flatten(-2)
        target = self._scaled(x)  # [B, n_branches, d]
        mse = (scaled - target).pow(2).sum((-2, -1)).mean()
        losses = {"mse_loss": mse}
        mask = step_input.dead_neuron_mask
        if mask is not None and (n_dead := int(mask.sum())) > 0:
            aux_acts = calculate_topk_aux_acts(min(self.cfg.auxk, n_dead), scores, mask)  # [B, F]
            recon = torch.einsum("bf,fnd->bnd", aux_acts / self.dec_norm_sum(), self.W_dec).flatten(-2)
            residual = (target - scaled).detach().flatten(-2)
            losses["auxk_loss"] = self.cfg.aux_loss_coefficient * (recon - residual).pow(2).sum(-1).mean()
        return _finish_step(self, step_input, x, out, acts, scores, losses)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Fold the summed decoder norms in (so acts are scores) and store the EMA cutoff as threshold."""
        s = self.dec_norm_sum().detach()  # [F]
        scale = state_dict.pop("branch_scale").to(state_dict["W_enc"].dtype)  # [n_branches]
        state_dict["W_enc"] = state_dict["W_enc"] * s * scale[:, None, None]
        state_dict["b_enc"] = state_dict["b_enc"] * s
        state_dict["W_dec"] = state_dict["W_dec"] / s[:, None, None] / scale[None, :, None]
        state_dict["b_dec"] = state_dict["b_dec"] / scale[:, None]
        state_dict["threshold"] = torch.full_like(
            self.b_enc.detach(), float(state_dict.pop("topk_threshold"))
        )


# ---- registration (one block; idempotent across re-imports) -----------------------------------------------
def _register() -> None:
    if "crosscoder" not in SAE_CLASS_REGISTRY:
        register_sae_class("crosscoder", Crosscoder, CrosscoderConfig)
    for cls, cfg_cls in (
        (BatchTopKTranscoderTrainingSAE, BatchTopKTranscoderTrainingSAEConfig),
        (BatchTopKSkipTranscoderTrainingSAE, BatchTopKSkipTranscoderTrainingSAEConfig),
        (BatchTopKCrosscoderTrainingSAE, BatchTopKCrosscoderTrainingSAEConfig),
    ):
        if cfg_cls.architecture() not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(cfg_cls.architecture(), cls, cfg_cls)


_register()
