"""A pipeline crosscoder on `mediated`, trained and mediated in process: its gate, pool and planted latents.

    .venv/bin/python scripts/mediated_pool.py --tag base
    for s in 0 1 2 3; do .venv/bin/python scripts/mediated_pool.py --tag s$s --seed $s | grep VERDICT; done
    .venv/bin/python scripts/mediated_pool.py --tag k2 --k 2 --extra '{"balance_branches": false}'

Trains the crosscoder exactly as the pipeline test's spec does (`saes.for_pair.train_for_pair` on the prompts
outside the mediation test split, events with 16 new tokens, the test's dictionary options; `--extra` passes
further `train_for_pair` keywords), runs `engine.mediation.mediate` at the headline boundary (top-4,
neighbours 2) and prints, for every latent that fired at the fit events' scored positions: activation rate,
fit score, PT decoder share, |cos| to the nearest planted direction, the IT decoder's projection on the
planted directions; then the pool, the causal checks, a one-line VERDICT (full gate, pool size, top-4 classes
and PT shares, each planted direction's best latent's PT share; ok = all of the pipeline test's dictionary
claims) and (`--verbose`) the IT-branch-only pre-activations at the scored positions of both IT-late cells
beside the inference threshold. About 10 s a run. Work goes to $MEDIATED_POOL_DIR (default /tmp/mediated_pool).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from crosspatch.engine.crosspatch import clean_passes, event_batches
from crosspatch.engine.divergence import DivergenceEvent, find_divergences
from crosspatch.engine.mediation import (
    BranchView,
    MediationConfig,
    MediationResult,
    _capture_mlp,
    mediate,
    split_events,
)
from crosspatch.engine.organisms import load_expected, organism_path
from crosspatch.engine.pairs import ModelPair, load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.saes.for_pair import train_for_pair
from crosspatch.saes.load import Dictionary
from crosspatch.saes.quality import GateConfig

ROOT = Path(os.environ.get("MEDIATED_POOL_DIR", "/tmp/mediated_pool"))


def train(pair: ModelPair, events: list[DivergenceEvent], args: argparse.Namespace) -> Dictionary:
    """The pipeline test's crosscoder (tests/app/test_pipeline.py spec), on a fresh dictionary dir."""
    out = ROOT / pair.pair_id / args.tag
    shutil.rmtree(out / "dictionary", ignore_errors=True)
    base_cache = ROOT / pair.pair_id / "cache"  # the activation cache does not depend on the options
    if base_cache.exists() and not (out / "cache").exists():
        shutil.copytree(base_cache, out / "cache")
    org = organism_path(pair.pair_id)
    d = train_for_pair(
        pair,
        load_prompts(org / "prompts.jsonl"),
        out,
        architecture="batchtopk_crosscoder",
        width=args.width,
        k=args.k,
        training_tokens=args.tokens,
        continuation_tokens=160,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        events=events,
        max_new_tokens=16,
        gate=GateConfig(min_heldout_tokens=100, alive_range=(0.01, 0.6)),
        **{"balance_branches": True, **json.loads(args.extra)},
    )
    if not base_cache.exists():
        shutil.copytree(out / "cache", base_cache)
    return d


def report(pair: ModelPair, d: Dictionary, res: MediationResult) -> None:
    """Per fired latent: rate, score, PT share, planted |cos| and projection; then pool and checks."""
    r = res.ranking
    planted = torch.tensor(load_expected(pair.pair_id)["mediators"]["directions"]).float()
    planted = planted / planted.norm(dim=-1, keepdim=True)  # [4, d]
    w_pt, w_it = d.W_dec["pt"].float(), d.W_dec["it"].float()  # [F, d]
    share = w_pt.norm(dim=-1) / (w_pt.norm(dim=-1) + w_it.norm(dim=-1))  # [F]
    proj = w_it @ planted.T  # [F, 4]
    cos = (proj / w_it.norm(dim=-1, keepdim=True)).abs().max(-1).values  # [F]
    metrics = d.meta["metrics"]
    print(
        f"gate {d.gate_status}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("fve", "l0", "alive_f")))
    )
    top = set(r.top(4))
    print("latent rate score    pt_share |cos| proj_on_planted(IT)")
    for f in sorted(np.nonzero(r.active_rate > 0)[0], key=lambda f: -r.score[f]):
        lat = r.keys[f][1]
        print(
            f"{lat:5d} {r.active_rate[f]:.2f} {r.score[f]:+.4f} {share[lat]:.3f}    {cos[lat]:.3f} "
            f"{np.array2string(proj[lat].numpy(), precision=3)}{' top' if f in top else ''}"
        )
    mr = res.controls["matched_random"]
    print("pool", mr["pool"], "excluded", mr["excluded"])
    for c in res.checks:
        print(c["name"], c["value"], c["passed"], c["detail"][:160])
    top4 = [r.keys[f][1] for f in r.top(4)]
    classes = sorted({int(proj[lat].abs().argmax()) for lat in top4 if cos[lat] >= 0.9})
    best = (w_it / w_it.norm(dim=-1, keepdim=True) @ planted.T).abs().max(0)  # per planted direction
    ok = (
        all(cos[lat] >= 0.9 for lat in top4)
        and float(share[top4].max()) <= 0.05
        and all(float(share[i]) <= 0.05 for i in best.indices)
        and d.gate_status == "passed"
        and sum(mr["pool"].values()) >= 5
    )
    print(
        f"VERDICT gate={d.gate_status} pool={sum(mr['pool'].values())} top4_classes={classes} "
        f"top4_share_max={float(share[top4].max()):.3f} "
        f"best_share={[round(float(share[i]), 3) for i in best.indices]} "
        f"ok={ok}"
    )
    ib = d.sae.input_mean[1].float() @ planted.T, d.sae.b_dec[1].detach().float() @ planted.T
    print("IT input_mean / b_dec on planted:", *(np.array2string(v.numpy(), precision=3) for v in ib))


@torch.no_grad()
def preacts(pair: ModelPair, d: Dictionary, events: list[DivergenceEvent], boundary: int) -> None:
    """Top IT-branch-only pre-activations at the fit events' scored positions, both IT-late cells."""
    fit, _ = split_events(events, 0.27, 0)
    sae = d.sae
    print("inference threshold", float(sae.threshold.detach().float().mean()))
    for batch, ids, mask, tokens in event_batches(pair, fit, 16):
        passes = clean_passes(pair, ids, mask, [boundary])
        for up in ("it", "pt"):
            outs, _ = _capture_mlp(pair, up, passes, boundary, tokens, [d.layer], with_grad=False)
            x = outs[d.layer][0].float()  # [batch, d]
            pre = (x - sae.input_mean[1]) @ sae.W_enc[1] + sae.b_enc  # [batch, F]
            for e, row in zip(batch, pre, strict=True):
                t = row.topk(4)
                pairs = [(int(i), round(float(v), 2)) for v, i in zip(t.values, t.indices, strict=True)]
                print(f"{up}-up {e.prompt_id}", pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--organism", default="llama_mediated")
    p.add_argument("--tag", required=True, help="names the work directory of this variant")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--k", type=float, default=1.5)
    p.add_argument("--tokens", type=int, default=600_000)
    p.add_argument("--neighbours", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--extra", default="{}", help="JSON keywords for train_for_pair")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    org = organism_path(args.organism)
    pair = load_pair(org / "pt", org / "it", family=args.organism.split("_")[0], pair_id=args.organism)
    events = find_divergences(pair, load_prompts(org / "prompts.jsonl"), max_new_tokens=16, batch_size=16)
    headline = round(0.6 * pair.n_layers)
    d = train(pair, events, args)
    cfg = MediationConfig(
        top_k=4, ks=(4,), neighbours=args.neighbours, boundary=headline, batch_size=16, allow_failed_gate=True
    )
    report(pair, d, mediate(pair, events, [BranchView(d, "it")], cfg))
    if args.verbose:
        preacts(pair, d, events, headline)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
