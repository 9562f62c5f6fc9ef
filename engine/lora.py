"""Domain-training controls with verified learning (method §4.2): a LoRA continued-pretraining descendant.

Does *any* fine-tune give an interaction? The control trains a LoRA adapter on plain domain text from the
base (`peft`; the method's recipe as defaults: r 32, alpha 64, dropout 0, q/k/v/o/gate/up/down, AdamW lr 1e-4,
wd 0, cosine with 3% warmup, grad-norm clip 1.0), merges it, and verifies before any 2x2 is read:

  * `domain_nll`: held-out domain NLL (nats/token) improves by at least `min_nll_improvement` (relative;
    the paper's controls passed with 4.66% and 4.81%);
  * `merge_equivalence`: the merged model's logits equal the unmerged base + adapter's on held-out text
    (max |diff| <= `merge_tolerance` x max(1, max |logit|));
  * `generation_health`: greedy generations from held-out prefixes are not degenerate (distinct-token share
    >= `min_distinct`, no token above `max_token_share` of the output).

Only a control that passes all three is `valid`; its 2x2 (base as PT, merged descendant as IT) is then a
result. A control that fails verification is reported `not_valid` with the failed checks, and no interaction
is reported for it: a failed control is never a null result. Training checkpoints (adapter, optimizer, step)
every `checkpoint_every` steps and resumes from the last one; each step's batch depends only on (seed, step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.engine.errors import CrosspatchError

METHOD_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(frozen=True)
class LoraControlConfig:
    """Training and verification settings; defaults are the method's (§4.2) where it states them."""

    rank: int = 32
    alpha: int = 64
    dropout: float = 0.0
    targets: tuple[str, ...] = METHOD_TARGETS
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.03
    grad_clip: float = 1.0
    train_tokens: int = 20_000_000
    seq_len: int = 4096
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = no checkpoints
    min_nll_improvement: float = 0.02  # relative drop of held-out NLL the control must reach
    merge_tolerance: float = 1e-4
    min_distinct: float = 0.1
    max_token_share: float = 0.5
    health_prompts: int = 4
    health_tokens: int = 32

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0 or self.train_tokens < 1:
            raise ValueError("rank >= 1, alpha > 0, lr > 0 and train_tokens >= 1 are required")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("seq_len >= 2 and batch_size >= 1 are required")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_nll_improvement < 1:
            raise ValueError("warmup_fraction and min_nll_improvement must lie in [0, 1)")
        if not self.targets:
            raise ValueError(f"targets must name modules, e.g. {', '.join(METHOD_TARGETS)}")

    @property
    def steps(self) -> int:
        return max(1, self.train_tokens // (self.batch_size * self.seq_len))


@dataclass
class Verification:
    """The three checks of a trained control; `valid` only when all pass."""

    nll_before: float
    nll_after: float
    nll_improvement: float  # (before - after) / before
    merge_max_diff: float
    distinct_share: float
    max_token_share: float
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]


@dataclass
class LoraControl:
    """A trained, merged and verified control: where the merged model is and what verification found."""

    merged_dir: Path
    verification: Verification
    config: LoraControlConfig
    steps_done: int
    losses: list[float]

    @property
    def status(self) -> str:
        return "valid" if self.verification.valid else "not_valid"

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "failed_checks": self.verification.failed,
            "merged_dir": str(self.merged_dir),
            "verification": asdict(self.verification),
            "config": asdict(self.config),
            "steps_done": self.steps_done,
        }


def token_windows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate the texts' ids (each with its BOS, EOS between) and cut `[n, seq_len]` windows."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t, add_special_tokens=True)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise CrosspatchError(f"corpus has {len(ids)} tokens, fewer than one window of seq_len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def mean_nll(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats/token) of `model` on `[n, seq]` windows."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(model.device)  # [b, seq]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [b, seq-1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count


def _lr_at(step: int, cfg: LoraControlConfig) -> float:
    """Linear warmup then cosine decay to 0 (the method's schedule)."""
    warm = max(1, round(cfg.warmup_fraction * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_lora_control(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    out_dir: str | Path,
    cfg: LoraControlConfig = LoraControlConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
) -> LoraControl:
    """Train a LoRA adapter on `train_texts` from `base`, merge it into `out_dir/merged`, verify it."""
    try:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict
    except ImportError as e:
        raise CrosspatchError(
            "domain-training controls need peft (a crosspatch dependency): pip install peft"
        ) from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = token_windows(tokenizer, train_texts, cfg.seq_len)  # [n, seq]
    held = token_windows(tokenizer, heldout_texts, cfg.seq_len)
    nll_before = mean_nll(base, held, cfg.batch_size)

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
    )
    model = get_peft_model(base, lora)  # wraps `base` in place: its own weights stay frozen
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint.pt"
    start, losses = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=model.device, weights_only=False)
        set_peft_model_state_dict(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
    model.train()
    for step in range(start, cfg.steps):
        rows = np.random.default_rng([cfg.seed, step]).integers(0, len(train), cfg.batch_size)
        ids = train[torch.as_tensor(rows)].to(model.device)  # [batch, seq]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, cfg.steps, losses[-1])
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            state = {"adapter": get_peft_model_state_dict(model), "optimizer": opt.state_dict()}
            torch.save({**state, "step": step + 1, "losses": losses}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    model.eval()
    with torch.no_grad():
        adapter_logits = [model(input_ids=held[:2].to(model.device)).logits.float().cpu()]
    merged = model.merge_and_unload()  # base weights + B A x alpha / r, adapters removed
    merged.eval()
    merged.requires_grad_(False)
    merged_dir = out / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    verification = verify(merged, tokenizer, held, adapter_logits[0], nll_before, heldout_texts, cfg)
    control = LoraControl(merged_dir, verification, cfg, cfg.steps, losses)
    (out / "control.json").write_text(json.dumps(control.to_dict(), indent=2))
    return control


@torch.no_grad()
def verify(
    merged: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held: torch.Tensor,
    adapter_logits: torch.Tensor,
    nll_before: float,
    heldout_texts: Sequence[str],
    cfg: LoraControlConfig,
) -> Verification:
    """The three checks: domain NLL gate, merge equivalence, generation health."""
    nll_after = mean_nll(merged, held, cfg.batch_size)
    improvement = (nll_before - nll_after) / nll_before
    merged_logits = merged(input_ids=held[:2].to(merged.device)).logits.float().cpu()
    diff = float((merged_logits - adapter_logits).abs().max())
    scale = max(1.0, float(adapter_logits.abs().max()))
    generated: list[int] = []
    for text in list(heldout_texts)[: cfg.health_prompts]:
        ids = tokenizer.encode(text, add_special_tokens=True)[:8]
        prompt = torch.tensor([ids], device=merged.device)
        out = merged.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=cfg.health_tokens, do_sample=False
        )
        generated += out[0, len(ids) :].tolist()
    distinct = len(set(generated)) / max(1, len(generated))
    top_share = max(np.bincount(generated).max() / len(generated), 0.0) if generated else 1.0
    checks = {
        "domain_nll": bool(improvement >= cfg.min_nll_improvement),
        "merge_equivalence": bool(diff <= cfg.merge_tolerance * scale),
        "generation_health": bool(
            generated and distinct >= cfg.min_distinct and top_share <= cfg.max_token_share
        ),
    }
    return Verification(nll_before, nll_after, float(improvement), diff, distinct, float(top_share), checks)


def control_crosspatch(
    control: LoraControl,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    boundary: int | float | str | None = None,
    n_resamples: int = 2000,
    seed: int = 23,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    pair_id: str = "lora-control",
) -> tuple[dict, pa.Table | None, list]:
    """The 2x2 of `base` (PT) vs the merged control (IT) on `prompts`, only for a valid control.

    Returns (record, cells, events): the control's record with `interaction` = {mean, ci_low, ci_high, n}
    when valid; a control that failed verification gets `interaction: None`, no cells and no events (its
    failed checks are in the record; it is never a null result).
    """
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.pairs import ModelPair, load_model
    from crosspatch.engine.stats import bootstrap_ci

    record = control.to_dict()
    if control.status != "valid":
        record["interaction"] = None
        return record, None, []
    merged, _ = load_model(control.merged_dir, device=str(base.device), dtype=base.dtype)
    pair = ModelPair.from_models(base, merged, tokenizer, pair_id=pair_id)
    events = find_divergences(pair, prompts, max_new_tokens, batch_size)
    diverged = [e for e in events if e.diverged]
    if not diverged:
        raise CrosspatchError("the control never diverges from its base on these prompts: no 2x2 to read")
    cells = crosspatch(pair, diverged, boundary=boundary, batch_size=batch_size)
    mean, lo, hi = bootstrap_ci(cells.column("interaction").to_numpy(), n_resamples, seed)
    record["interaction"] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(diverged)}
    return record, cells, events


def control_row(record: dict, family: str, pair_id: str) -> dict:
    """One `LORA_CONTROL_SCHEMA` row from a control record."""
    v, inter = record["verification"], record.get("interaction") or {}
    return {
        "family": family,
        "pair_id": pair_id,
        "status": record["status"],
        "failed_checks": ",".join(record["failed_checks"]),
        "nll_before": v["nll_before"],
        "nll_after": v["nll_after"],
        "nll_improvement": v["nll_improvement"],
        "min_nll_improvement": record["config"]["min_nll_improvement"],
        "merge_max_diff": v["merge_max_diff"],
        "distinct_share": v["distinct_share"],
        "max_token_share": v["max_token_share"],
        "steps": record["steps_done"],
        "interaction": inter.get("mean"),
        "ci_low": inter.get("ci_low"),
        "ci_high": inter.get("ci_high"),
        "n_events": inter.get("n"),
    }
