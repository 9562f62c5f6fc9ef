"""(Re)build the constructed model organisms into the cache and list the shipped trained ones.

    .venv/bin/python scripts/build_organisms.py                        # rebuild all, seed 0
    .venv/bin/python scripts/build_organisms.py --name llama_mediated --seed 3 --cache-dir /tmp/orgs

Constructed organisms go to `$CROSSPATCH_CACHE_DIR/organisms` (default `~/.cache/crosspatch/organisms`)
unless --cache-dir is given. Trained organisms ship with the package; retrain them with
scripts/train_organisms.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crosspatch.engine.organisms import list_organisms, organism_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", action="append", choices=list_organisms("constructed"), help="default: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="reuse cached builds instead of rebuilding")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for name in args.name or list_organisms("constructed"):
        t0 = time.perf_counter()
        path = organism_path(name, seed=args.seed, cache_dir=args.cache_dir, rebuild=not args.keep)
        print(f"{name:28s} {time.perf_counter() - t0:6.2f}s  {path}")
    print(f"built in {time.perf_counter() - start:.2f}s")
    for name in list_organisms("trained"):
        try:
            print(f"{name:28s} shipped  {organism_path(name)}")
        except FileNotFoundError as e:
            print(f"{name:28s} MISSING  {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
