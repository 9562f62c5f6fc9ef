"""`python -m crosspatch.app.worker --device cpu`: the same worker as `crosspatch worker`."""

from __future__ import annotations

import argparse

from crosspatch.app.config import Settings, get_settings
from crosspatch.app.log import configure_logging
from crosspatch.app.worker.main import Worker


def healthcheck(settings: Settings, device: str) -> int:
    """A container healthcheck: the job store answers and the worker's device is usable; prints why not."""
    import sys

    import torch
    from sqlalchemy import text

    from crosspatch.app.store.session import Store

    try:
        store = Store.from_settings(settings)
        try:
            with store.session(write=False) as s:
                s.execute(text("SELECT 1"))
        finally:
            store.dispose()
    except Exception as e:  # any driver error means unhealthy
        print(f"unhealthy: job store unreachable: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            print(f"unhealthy: device {device} is not available", file=sys.stderr)
            return 1
    print(f"healthy: job store reachable, device {device}")
    return 0


def _run_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosspatch.app.worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-jobs", type=int, default=None)
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument(
        "--healthcheck",
        action="store_true",
        help="Check the job store and the device, then exit (0: healthy).",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.healthcheck:
        return healthcheck(settings, args.device or settings.device)
    configure_logging(settings.log_level)
    worker = Worker(settings, device=args.device or settings.device)
    worker.install_signal_handlers()
    worker.run(max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_run_cli())
