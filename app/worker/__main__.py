"""`python -m crosspatch.app.worker --device cpu`: the same worker as `crosspatch worker`."""

from __future__ import annotations

import argparse

from crosspatch.app.config import get_settings
from crosspatch.app.log import configure_logging
from crosspatch.app.worker.main import Worker


def _run_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosspatch.app.worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-jobs", type=int, default=None)
    parser.add_argument("--exit-when-idle", action="store_true")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    worker = Worker(settings, device=args.device or settings.device)
    worker.install_signal_handlers()
    worker.run(max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_run_cli())
