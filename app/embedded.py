"""The service in a background thread on a free 127.0.0.1 port: the demo, tests and benchmarks use it."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from crosspatch.app.config import Settings
from crosspatch.app.main import create_app


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, outside the kernel's ephemeral range.

    Outside it, no outgoing connection can take the port while a server that owns it restarts on it
    (the chaos test's API and PostgreSQL are killed and restarted on the same port).
    """
    low, high = _ephemeral_range()
    candidates = [p for p in range(10_000, 65_536) if not low <= p <= high]
    rng = random.Random()  # fresh OS entropy: parallel test processes do not draw the same sequence
    for port in rng.sample(candidates, 200) if candidates else []:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate is taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceThread:
    """`create_app(settings)` under uvicorn in a thread: `start()` waits for /health, `stop()` shuts it down.

    With `embedded_worker=True` the app's lifespan also starts (and stops) one local worker process.
    """

    def __init__(
        self, settings: Settings, embedded_worker: bool = False, startup_timeout: float = 60.0
    ) -> None:
        self.settings = settings
        # bound here and handed to uvicorn: no window in which a parallel test could take the port (and
        # no chance of polling another test's server that got it)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        config = uvicorn.Config(
            create_app(settings, embedded_worker=embedded_worker),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if not self.thread.is_alive():
            raise RuntimeError(f"the service on port {self.port} exited during start-up")
        raise RuntimeError(f"the service did not start within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
