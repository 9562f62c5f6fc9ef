"""One entry point, `train_dictionary(cfg, cache, out_dir)`, for SAEs, transcoders and crosscoders.

Every kind is trained by sae_lens's own `SAETrainer` (Adam, lr schedule, grad clipping, dead-latent
tracking, trainer-state checkpoints); crosspatch only drives its public seams (`step`,
`maybe_reset_sparsity`, `save_checkpoint`, `load_trainer_state`) so that it can report progress, checkpoint
on its own cadence, resume after a kill and checkpoint on SIGTERM. SAEs use sae_lens's architectures
(batchtopk, topk, jumprelu, standard, ...); transcoders and crosscoders use the sae_lens-style classes in
`saes.arch`. Data comes from an `ActivationCache` (or any object with its `batches`/`load`/`check_key`).

Configs (one dataclass per architecture, the registry, `make_config`, `config_from_dict`) live in
`saes.configs`; this module re-exports them, so `from crosspatch.saes.train import make_config` still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE

from crosspatch.saes import arch
from crosspatch.saes.cache import ActivationCache, ActivationSource, TensorSource
from crosspatch.saes.configs import (
    CONFIGS,
    BatchTopKSAETrain,
    CrosscoderTrain,
    JumpReLUSAETrain,
    SkipTranscoderTrain,
    StandardSAETrain,
    TopKSAETrain,
    TrainConfig,
    TranscoderTrain,
    config_from_dict,
    make_config,
    register_config,
)
from crosspatch.saes.errors import CacheError, DictionaryConfigError
from crosspatch.saes.export import export_crosscoder_branches, hf_module, sae_lens_metadata
from crosspatch.saes.load import Dictionary, load_dictionary, write_meta

if TYPE_CHECKING:  # quality imports the models' side (adapters); train imports it only to evaluate
    from transformers import PreTrainedModel

    from crosspatch.saes.quality import GateConfig


# ---- the runner ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What the progress callback receives every `log_every` steps (and at the end)."""

    step: int
    total_steps: int
    tokens: int
    tokens_per_s: float
    loss: float
    mse: float
    l0: float
    dead_fraction: float
    resumed_from: int


def _open_source(cache: ActivationSource | str | Path) -> ActivationSource:
    if isinstance(cache, (str, Path)):
        return ActivationCache(cache)
    if not hasattr(cache, "batches"):
        raise CacheError(
            f"expected an ActivationCache, a cache directory or a TensorSource, not {type(cache).__name__}"
        )
    return cache


def dictionary_id(cfg: TrainConfig, source: ActivationSource) -> str:
    """Readable and unique enough: site, architecture, width, k, seed and a hash of config + data."""
    digest = hashlib.sha256(
        json.dumps(
            [cfg.to_dict(), source.manifest.get("models"), source.manifest.get("source")],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:8]
    k = f"-k{cfg.k_value:g}" if cfg.k_value is not None else ""
    return f"{cfg.model_role}-L{cfg.layer}-{cfg.hook_point}-{cfg.architecture()}-w{cfg.width}{k}-s{cfg.seed}-{digest}"


class _Checkpointer:
    """Checkpoints under `<out>/checkpoints/step_N` plus an atomically written `latest.json` pointer."""

    def __init__(self, out_dir: Path, cfg: TrainConfig) -> None:
        self.root = out_dir / "checkpoints"
        self.cfg = cfg

    def latest(self) -> Path | None:
        p = self.root / "latest.json"
        if not p.exists():
            return None
        try:
            info = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        path = self.root / info["dir"]
        return path if path.exists() else None

    def save(self, trainer: SAETrainer, extra: dict[str, Any]) -> Path:
        name = f"step_{trainer.n_training_steps:08d}"
        trainer.save_checkpoint(name, base_path=self.root)  # weights (unwrapped state_dict) + trainer state
        info = {
            "dir": name,
            "step": trainer.n_training_steps,
            "samples": trainer.n_training_samples,
            "config": self.cfg.to_dict(),
            **extra,
        }
        (self.root / name / "crosspatch_checkpoint.json").write_text(json.dumps(info, indent=1))
        tmp = self.root / "latest.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.root / "latest.json")
        for old in self.root.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return self.root / name

    def load(self, path: Path, sae: TrainingSAE[Any], trainer: SAETrainer) -> dict[str, Any]:
        info = json.loads((path / "crosspatch_checkpoint.json").read_text())
        if info["config"] != self.cfg.to_dict():
            raise DictionaryConfigError(
                f"checkpoint at {path} was made with a different config; use a new output directory"
            )
        sae.load_weights_from_checkpoint(path)
        trainer.load_trainer_state(path)
        return info


def build_training_sae(cfg: TrainConfig, d_model: int) -> TrainingSAE[Any]:
    """The sae_lens training module for `cfg`, initialised from `cfg.seed`."""
    sae_cfg = cfg.sae_lens_config(d_model)
    torch.manual_seed(cfg.seed)
    cls = get_sae_training_class(sae_cfg.architecture())[0]
    return cls(sae_cfg)


def trainer_config(cfg: TrainConfig) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=cfg.training_tokens,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_scheduler_name=cfg.lr_scheduler,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        lr_end=cfg.lr / 10,
        device=cfg.device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
    )


def train_dictionary(
    cfg: TrainConfig,
    cache: ActivationSource | str | Path,
    out_dir: str | Path,
    *,
    progress: Callable[[Progress], None] | None = None,
    log_every: int = 100,
    checkpoint_every: int = 0,
    resume: bool = True,
    keep_checkpoints: bool = False,
    evaluate: bool = True,
    models: dict[str, PreTrainedModel] | None = None,
    gate: GateConfig | None = None,
    data: Callable[[int], Iterator[torch.Tensor]] | None = None,
    stop_after_steps: int | None = None,
) -> Dictionary:
    """Train the dictionary `cfg` describes on `cache` and save it (sae_lens format + meta) in `out_dir`.

    `checkpoint_every` steps (0: never) a checkpoint is written; with `resume`, a run finding one in
    `out_dir/checkpoints` continues from it (same seed and data order: the result equals an uninterrupted
    run). SIGTERM checkpoints, then re-raises. `data(start_sample)` overrides the batch stream (an injected
    iterator). After training the dictionary is evaluated on the held-out split (`evaluate`; with `models`
    {role: model} also spliced into the model) and marked passed/failed against `gate`.
    `stop_after_steps` ends the run early without saving a final dictionary (returns None; for tests).
    """
    cfg.validate()
    source = _open_source(cache)
    keys = cfg.data_keys(source)
    d_model = int(source.d_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def stream(start: int) -> Iterator[torch.Tensor]:
        if data is not None:
            return data(start)
        return source.batches(
            keys,
            cfg.batch_size,
            seed=cfg.seed,
            split="train",
            heldout_fraction=cfg.heldout_fraction,
            start_sample=start,
        )

    sae = build_training_sae(cfg, d_model)
    if isinstance(sae, arch.BatchTopKCrosscoderTrainingSAE):
        sae.input_mean.copy_(_estimate_mean(stream(0), cfg))
        if getattr(cfg, "balance_branches", False):
            sae.branch_scale.copy_(_estimate_branch_scale(stream(0), cfg, sae.input_mean))
    ckpt = _Checkpointer(out, cfg)
    latest = ckpt.latest() if resume else None
    if not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    batches: Iterator[torch.Tensor] | None = None
    trainer = SAETrainer(cfg=trainer_config(cfg), sae=sae, data_provider=iter(()))
    resumed_from = 0
    if latest is not None:
        ckpt.load(latest, sae, trainer)
        resumed_from = trainer.n_training_steps
    batches = stream(trainer.n_training_samples)
    trainer.data_provider = batches
    _estimate_scaling(trainer, sae)

    terminate = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: terminate.set())
    sae.to(cfg.device)
    t0, samples0 = time.perf_counter(), trainer.n_training_samples
    out_step = None
    try:
        while trainer.n_training_samples < cfg.training_tokens:
            trainer.maybe_reset_sparsity()
            out_step = trainer.step(next(batches))
            trainer.n_training_steps += 1
            step = trainer.n_training_steps
            if progress is not None and (
                step % log_every == 0 or trainer.n_training_samples >= cfg.training_tokens
            ):
                progress(_progress(trainer, out_step, cfg, t0, samples0, resumed_from))
            if checkpoint_every and step % checkpoint_every == 0:
                ckpt.save(trainer, {})
            if terminate.is_set():
                ckpt.save(trainer, {"reason": "SIGTERM"})
                raise KeyboardInterrupt("SIGTERM")
            if stop_after_steps is not None and step >= stop_after_steps:
                return None  # type: ignore[return-value]
    except KeyboardInterrupt:
        if terminate.is_set() and previous is not None:
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        if previous is not None and not terminate.is_set():
            signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - t0
    _fold_scaling(trainer, sae)
    trainer.set_final_sae_metadata()
    for key, value in _sae_lens_metadata(cfg, source).items():
        sae.cfg.metadata[key] = value
    sae.save_inference_model(out)
    dictionary = load_dictionary(out)
    if dictionary.kind == "crosscoder":
        export_crosscoder_branches(dictionary.sae, out)
    dictionary.meta.update(
        _meta(cfg, source, out, dictionary, trainer, seconds, samples0, resumed_from, out_step)
    )
    write_meta(out, dictionary.meta)
    if evaluate:
        from crosspatch.saes.quality import GateConfig, evaluate_dictionary

        evaluate_dictionary(
            dictionary,
            source,
            models=models,
            gate=gate or GateConfig(),
            heldout_fraction=cfg.heldout_fraction,
        )
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return dictionary


@torch.no_grad()
def _estimate_mean(batches: Iterator[torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Input mean per branch over the first `mean_estimate_batches` train batches: `[n_branches, d]`."""
    n = getattr(cfg, "mean_estimate_batches", 16)
    xs = [next(batches) for _ in range(n)]
    x = torch.cat(xs).float()  # [n * B, n_branches * d]
    return x.mean(0).reshape(len(getattr(cfg, "branches", [0])), -1)


@torch.no_grad()
def _estimate_branch_scale(
    batches: Iterator[torch.Tensor], cfg: TrainConfig, mean: torch.Tensor
) -> torch.Tensor:
    """Per branch sqrt(d) / mean centered norm over the mean's batches: `[n_branches]`."""
    n = getattr(cfg, "mean_estimate_batches", 16)
    x = torch.cat([next(batches) for _ in range(n)]).float()  # [n * B, n_branches * d]
    centered = x.reshape(x.shape[0], *mean.shape) - mean  # [n * B, n_branches, d]
    norms = centered.norm(dim=-1).mean(0).clamp_min(1e-12)  # [n_branches]
    return mean.shape[-1] ** 0.5 / norms


def _estimate_scaling(trainer: SAETrainer, sae: TrainingSAE[Any]) -> None:
    """As `SAETrainer.fit` does: estimate the activation norm scaler before the first step."""
    if (
        sae.cfg.normalize_activations == "expected_average_only_in"
        and trainer.activation_scaler.scaling_factor is None
    ):
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=sae.cfg.d_in,
            data_provider=trainer.data_provider,
            n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
        )


def _fold_scaling(trainer: SAETrainer, sae: TrainingSAE[Any]) -> None:
    """As `SAETrainer.fit` does at the end: fold the activation scaler into the weights."""
    if trainer.activation_scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None


@torch.no_grad()
def _progress(
    trainer: SAETrainer, out: Any, cfg: TrainConfig, t0: float, samples0: int, resumed: int
) -> Progress:
    dt = max(time.perf_counter() - t0, 1e-9)
    return Progress(
        step=trainer.n_training_steps,
        total_steps=cfg.total_steps,
        tokens=trainer.n_training_samples,
        tokens_per_s=(trainer.n_training_samples - samples0) / dt,
        loss=float(out.loss.detach()),
        mse=float(out.losses["mse_loss"].detach()),
        l0=float((out.feature_acts > 0).float().sum(-1).mean()),
        dead_fraction=float(trainer.dead_neurons.float().mean()),
        resumed_from=resumed,
    )


def _sae_lens_metadata(cfg: TrainConfig, source: ActivationSource) -> dict[str, Any]:
    """sae_lens metadata (hook_name, model_name, context_size, dataset_path, ...) from the cache."""
    cache_path = str(source.path.resolve()) if getattr(source, "path", None) else None
    md = sae_lens_metadata(
        kind=cfg.KIND,
        layer=cfg.layer,
        hook_point=cfg.hook_point,
        role=cfg.model_role,
        manifest=source.manifest,
        cache_path=cache_path,
    )
    if cfg.KIND == "crosscoder":  # one model per branch: named per branch (and per exported branch SAE)
        models = source.manifest.get("models") or {}
        md["branch_models"] = {b: (models.get(b) or {}).get("path") for b in getattr(cfg, "branches", [])}
    return md


def _meta(
    cfg: TrainConfig,
    source: ActivationSource,
    out: Path,
    d: Dictionary,
    trainer: SAETrainer,
    seconds: float,
    samples0: int,
    resumed_from: int,
    out_step: Any,
) -> dict[str, Any]:
    m = source.manifest
    return {
        "id": dictionary_id(cfg, source),
        "kind": cfg.KIND,
        "architecture": cfg.architecture(),
        "saved_architecture": d.sae.cfg.architecture(),
        "model_role": cfg.model_role,
        "branches": list(getattr(cfg, "branches", [cfg.model_role])),
        "layer": cfg.layer,
        "hook_point": cfg.hook_point,
        "input_hook": "mlp_in" if cfg.KIND == "transcoder" else cfg.hook_point,
        "hook_name": d.sae.cfg.metadata.hook_name,
        "hf_module": hf_module(m, cfg.model_role if cfg.KIND != "crosscoder" else d.branches[-1], cfg.layer),
        "width": cfg.width,
        "k": cfg.k_value,
        "training_tokens": trainer.n_training_samples,
        "train_config": cfg.to_dict(),
        "cache": {
            "path": str(source.path.resolve()) if getattr(source, "path", None) else None,
            "models": m.get("models"),
            "source": m.get("source"),
        },
        "train_stats": {
            "steps": trainer.n_training_steps,
            "resumed_from_step": resumed_from,
            "seconds": round(seconds, 3),
            "tokens_per_s": (trainer.n_training_samples - samples0) / max(seconds, 1e-9),
            "final_loss": float(out_step.loss.detach()) if out_step is not None else None,
            "train_l0": getattr(d.sae.cfg.metadata, "l0", None),
        },
        "metrics": {},
        "gate": {"status": "not_evaluated"},
        "path": str(out.resolve()),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": os.environ.get("CROSSPATCH_USER") or os.environ.get("USER") or "unknown",
    }


__all__ = [
    "CONFIGS",
    "BatchTopKSAETrain",
    "CrosscoderTrain",
    "JumpReLUSAETrain",
    "Progress",
    "SkipTranscoderTrain",
    "StandardSAETrain",
    "TensorSource",
    "TopKSAETrain",
    "TrainConfig",
    "TranscoderTrain",
    "config_from_dict",
    "make_config",
    "register_config",
    "train_dictionary",
]
