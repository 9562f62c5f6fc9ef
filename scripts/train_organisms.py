"""Train the shipped organisms: a tiny PT on a synthetic corpus, then an IT fine-tuned from it.

    .venv/bin/python scripts/train_organisms.py                 # all families, seed 0
    .venv/bin/python scripts/train_organisms.py --family llama  # one family

Writes engine/organisms/shipped/trained_<family>/{pt,it}/ (fp32 safetensors + tokenizer), prompts.jsonl,
prompts_heldout.jsonl and expected.json. Deterministic in --seed on one machine (single thread, fixed data
order); the shipped files are what this script produced.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crosspatch.engine.organisms import SHIPPED_DIR, TRAINED_FAMILIES  # noqa: E402
from crosspatch.engine.organisms.build import write_jsonl, write_pair  # noqa: E402
from crosspatch.engine.organisms.corpus import it_example, pt_document, trained_prompts  # noqa: E402
from crosspatch.engine.organisms.tiny import tiny_config  # noqa: E402
from crosspatch.engine.organisms.tokenizer import build_tokenizer  # noqa: E402

N_PROMPTS, N_HELDOUT = 64, 32


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedules shared by every family (what expected.json records)."""

    n_layers: int = 4
    seq_len: int = 64
    batch_size: int = 32
    pt_steps: int = 1000
    pt_lr: float = 3e-3
    it_steps: int = 400
    it_lr: float = 1e-3
    it_raw_share: float = 0.3
    warmup: int = 50


def pt_batch(rng: random.Random, tok: PreTrainedTokenizerFast, cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """`[batch, seq_len]` windows of concatenated raw documents, each window starting with BOS."""
    rows = []
    for _ in range(cfg.batch_size):
        ids = [tok.bos_token_id]
        while len(ids) < cfg.seq_len:
            ids += tok.encode(pt_document(rng), add_special_tokens=False)
        rows.append(ids[: cfg.seq_len])
    ids = torch.tensor(rows)  # [batch, seq]
    return ids, torch.ones_like(ids), ids.clone()


def it_batch(rng: random.Random, tok: PreTrainedTokenizerFast, cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """`[batch, seq]` BOS + exchange + EOS, right-padded; padding is masked out of the loss.

    A share `cfg.it_raw_share` of rows are raw PT documents instead, so IT keeps PT's language and its
    continuations of raw text depart from PT's later than its answers to questions do.
    """
    rows = []
    for _ in range(cfg.batch_size):
        if rng.random() < cfg.it_raw_share:
            rows.append([tok.bos_token_id, *tok.encode(pt_document(rng), add_special_tokens=False)])
        else:
            rows.append(
                [tok.bos_token_id, *tok.encode(it_example(rng), add_special_tokens=False), tok.eos_token_id]
            )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)  # [batch, seq]
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train(model: PreTrainedModel, make_batch, steps: int, lr: float, warmup: int) -> float:
    """AdamW with linear warmup and linear decay; returns the mean loss of the last 50 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )
    model.train()
    tail: list[float] = []
    for step in range(steps):
        ids, mask, labels = make_batch()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tail = [*tail[-49:], loss.item()]
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}", flush=True)
    return sum(tail) / len(tail)


def train_family(family: str, seed: int, cfg: TrainConfig, out_root: Path) -> Path:
    """Train PT then IT for `family` and write the organism directory (replacing an old one)."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    pt = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), cfg.n_layers), dtype=torch.float32)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    print(f"[{family}] PT: {sum(p.numel() for p in pt.parameters())} params", flush=True)
    pt_loss = train(pt, lambda: pt_batch(rng, tok, cfg), cfg.pt_steps, cfg.pt_lr, cfg.warmup)
    it = copy.deepcopy(pt)
    print(f"[{family}] IT fine-tune", flush=True)
    it_rng = random.Random(seed + 1)
    it_loss = train(it, lambda: it_batch(it_rng, tok, cfg), cfg.it_steps, cfg.it_lr, cfg.warmup)
    print(f"[{family}] trained in {time.perf_counter() - t0:.1f}s", flush=True)

    name = f"trained_{family}"
    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    write_pair(pt.eval(), it.eval(), tok, out)
    write_jsonl(out / "prompts.jsonl", trained_prompts(N_PROMPTS, seed + 100, f"{name}-"))
    write_jsonl(out / "prompts_heldout.jsonl", trained_prompts(N_HELDOUT, seed + 200, f"{name}-h"))
    expected = {
        "name": name,
        "kind": "trained",
        "family": family,
        "seed": seed,
        "n_layers": cfg.n_layers,
        "boundary": round(0.6 * cfg.n_layers),
        "readout": "it",
        "train_config": asdict(cfg),
        "final_loss": {"pt": round(pt_loss, 4), "it": round(it_loss, 4)},
        "every_prompt_diverges": False,
        "note": "no planted answer: a realistic demo pair; divergences come from the IT fine-tune",
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=TRAINED_FAMILIES, action="append", help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--pt-steps", type=int, default=TrainConfig.pt_steps)
    parser.add_argument("--it-steps", type=int, default=TrainConfig.it_steps)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = TrainConfig(pt_steps=args.pt_steps, it_steps=args.it_steps)
    for family in args.family or TRAINED_FAMILIES:
        print(train_family(family, args.seed, cfg, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
