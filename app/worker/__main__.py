"""`python -m crosspatch.app.worker --device cpu`: the same worker as `crosspatch worker`.

By default this process is the supervisor (`supervisor.py`) and the worker runs as its child
(`--child`); `--no-supervise` runs the worker in this process (no kill-and-replace, no budgets past
what the job's own checks enforce).
"""

from __future__ import annotations

import argparse
import os
import signal

from crosspatch.app.config import get_settings
from crosspatch.app.log import configure_logging
from crosspatch.app.worker.main import Worker
from crosspatch.app.worker.supervisor import STATUS_FD_ENV, Supervisor, die_with_parent


def _run_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosspatch.app.worker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-jobs", type=int, default=None)
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--no-supervise", action="store_true", help="Run the worker in this process.")
    parser.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = get_settings()
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
