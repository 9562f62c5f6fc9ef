"""`python -m crosspatch.app.worker --device cpu`: the same worker as `crosspatch worker`.

By default this process is the supervisor (`supervisor.py`) and the worker runs as its child
(`--child`); `--no-supervise` runs the worker in this process (no kill-and-replace, no budgets past
what the job's own checks enforce).
"""

from __future__ import annotations

import argparse
import os
import signal

from crosspatch.app.config import Settings, get_settings
from crosspatch.app.log import configure_logging
from crosspatch.app.worker.main import Worker
from crosspatch.app.worker.supervisor import STATUS_FD_ENV, Supervisor, die_with_parent


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
    parser.add_argument("--no-supervise", action="store_true", help="Run the worker in this process.")
    parser.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.healthcheck:
        return healthcheck(settings, args.device or settings.device)
    configure_logging(settings.log_level)
    device = args.device or settings.device
    if not args.child and not args.no_supervise:
        supervisor = Supervisor(
            settings, device, max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle, lock_fd=args.lock_fd
        )
        supervisor.install_signal_handlers()
        return supervisor.run()
    if args.child:
        die_with_parent(signal.SIGKILL)  # a worker never outlives its supervisor
    status_fd = int(os.environ[STATUS_FD_ENV]) if args.child and STATUS_FD_ENV in os.environ else None
    worker = Worker(settings, device=device, worker_id=args.worker_id, status_fd=status_fd)
    worker.install_signal_handlers()
    worker.run(max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_run_cli())
