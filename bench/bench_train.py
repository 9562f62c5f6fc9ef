"""Benchmark: SAE training through crosspatch vs. sae_lens's own `SAETrainer.fit` on the same cached data.

Both train the same BatchTopK SAE (same init seed, same batch stream from one activation cache, same
number of steps). crosspatch drives sae_lens's trainer step by step (progress, checkpoints, SIGTERM); this
measures what that costs. Prints tokens/s of each (median of `--repeats` interleaved runs), the ratio
(target >= 0.9) and the held-out FVE of each (target: within 0.02).

    .venv/bin/python bench/bench_train.py            # ~1 minute on a laptop CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_lens import SAETrainer

from crosspatch.engine.organisms.tiny import tiny_model
from crosspatch.saes.cache import ActivationCache, build_cache
from crosspatch.saes.load import Dictionary
from crosspatch.saes.quality import activation_metrics
from crosspatch.saes.train import build_training_sae, make_config, train_dictionary, trainer_config


def make_cache(root: Path, n_seqs: int) -> ActivationCache:
    g = torch.Generator().manual_seed(0)
    seqs = [[1, *torch.randint(3, 512, (48,), generator=g).tolist()] for _ in range(n_seqs)]
    return build_cache(
        root / "cache",
        tiny_model("llama", 0),
        seqs,
        layers="last:1",
        hook_points="mlp_out",
        shard_tokens=8192,
        batch_size=16,
    )


def run_sae_lens(cfg, cache: ActivationCache, out: Path) -> tuple[float, Dictionary]:
    """sae_lens's own loop: `SAETrainer(...).fit()` on the same batch stream."""
    keys = cfg.data_keys(cache)
    sae = build_training_sae(cfg, cache.d_model)
    data = cache.batches(
        keys, cfg.batch_size, seed=cfg.seed, split="train", heldout_fraction=cfg.heldout_fraction
    )
    trainer = SAETrainer(cfg=trainer_config(cfg), sae=sae, data_provider=data)
    t0 = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t0
    sae.save_inference_model(out)
    from crosspatch.saes.load import load_dictionary

    d = load_dictionary(out)
    d.meta.update(layer=cfg.layer, hook_point=cfg.hook_point, model_role=cfg.model_role)
    return trainer.n_training_samples / dt, d


def run_crosspatch(cfg, cache: ActivationCache, out: Path) -> tuple[float, Dictionary]:
    d = train_dictionary(
        cfg,
        cache,
        out,
        evaluate=False,
        resume=False,
        checkpoint_every=0,
        progress=lambda p: None,
        log_every=100,
    )
    return d.meta["train_stats"]["tokens_per_s"], d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--k", type=float, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cache = make_cache(root, n_seqs=640)
        print(f"cache: {cache.n_tokens} tokens of tiny llama L4 mlp_out in {time.perf_counter() - t0:.1f}s")
        cfg = make_config(
            "batchtopk",
            layer=4,
            model_role="model",
            width=args.width,
            k=args.k,
            training_tokens=args.steps * args.batch_size,
            batch_size=args.batch_size,
            lr=1e-3,
            dead_feature_window=200,
        )
        tps: dict[str, list[float]] = {"crosspatch": [], "sae_lens": []}
        dicts: dict[str, Dictionary] = {}
        for r in range(args.repeats):  # interleaved, alternating order, so machine load hits both alike
            order = ["crosspatch", "sae_lens"] if r % 2 == 0 else ["sae_lens", "crosspatch"]
            for name in order:
                run = run_crosspatch if name == "crosspatch" else run_sae_lens
                speed, d = run(cfg, cache, root / f"{name}-{r}")
                tps[name].append(speed)
                dicts[name] = d
        fve = {
            n: activation_metrics(d, cache, "heldout", cfg.heldout_fraction)["fve_model"]
            for n, d in dicts.items()
        }
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                dicts["crosspatch"].sae.state_dict().values(),
                dicts["sae_lens"].sae.state_dict().values(),
                strict=True,
            )
        )
    med = {n: statistics.median(v) for n, v in tps.items()}
    ratio = med["crosspatch"] / med["sae_lens"]
    print(
        f"steps {args.steps} x batch {args.batch_size}, width {args.width}, k {args.k}, "
        f"threads {args.threads}, repeats {args.repeats}"
    )
    for n in ("sae_lens", "crosspatch"):
        runs = ", ".join(f"{v:,.0f}" for v in tps[n])
        print(f"{n:>10}: {med[n]:,.0f} tokens/s (runs: {runs})  held-out FVE {fve[n]:.4f}")
    print(f"throughput ratio crosspatch/sae_lens: {ratio:.3f} (target >= 0.9)")
    print(
        f"FVE difference: {abs(fve['crosspatch'] - fve['sae_lens']):.4f} (target <= 0.02); "
        f"identical weights: {same}"
    )


if __name__ == "__main__":
    main()
