"""Service load test: 50 concurrent clients poll job status and submit jobs while a real job runs.

Starts the real service (`crosspatch serve --no-worker`: uvicorn on 127.0.0.1, a random free port,
SQLite job store and DuckDB in a temp dir) and one real worker process, registers a tiny saved PT/IT
pair, submits a crosspatch job long enough to outlast the load phase, and then runs `--clients` asyncio
clients (one httpx connection and one researcher key each) for `--warmup` + `--seconds`. Each polls the
running job's status every `--interval` seconds (jittered; the CLI's `wait` polls every 0.5 s; 0 = as
fast as the server answers) and submits a small divergence job every `--submit-every`-th request.
Prints p50/p95/p99/max latency of the status calls and of the submits, request counts and errors, and
the target check (status p99 < 100 ms). Traffic goes to 127.0.0.1 only; every loop is bounded by the
deadline; the server and worker are stopped at the end.

    .venv/bin/python bench/bench_load.py                   # 50 clients, 3 s warm-up + 20 s, 0.25 s interval
    .venv/bin/python bench/bench_load.py --interval 0.5 --worker-threads 1 --worker-nice 10
    .venv/bin/python bench/bench_load.py --interval 0      # saturation: clients never pause

On a CPU-only host the worker's torch threads compete with the API for cores; `--worker-threads 1
--worker-nice 10` runs it as a GPU host would (one core for the worker, the API first in line).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from crosspatch.engine.organisms.tiny import random_prompts, save_tiny_pair, tiny_sweep_spec

ROOT = Path(__file__).resolve().parents[1]

TARGET_P99_MS = 100.0


def prompts(n: int, seed: int) -> list[dict]:
    return [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(n, seed=seed)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def describe(name: str, ms: list[float]) -> str:
    if not ms:
        return f"{name:<8} n=0"
    return (
        f"{name:<8} n={len(ms):<6} p50={percentile(ms, 50):6.1f} ms  p95={percentile(ms, 95):6.1f} ms  "
        f"p99={percentile(ms, 99):6.1f} ms  max={max(ms):6.1f} ms  mean={statistics.fmean(ms):6.1f} ms"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


async def client_loop(
    i: int,
    base: str,
    key: str,
    job_id: str,
    start: float,
    deadline: float,
    args: argparse.Namespace,
    stats: dict[str, list],
) -> None:
    rng = random.Random(i)
    spec = {"kind": "divergence", "pair_id": "tiny-llama", "max_new_tokens": 4, "prompts": prompts(2, seed=i)}
    mine: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10, limits=limits) as c:
        n = 0
        await asyncio.sleep(rng.uniform(0, max(args.interval, 0.05)))  # spread the first requests
        while time.monotonic() < deadline:
            n += 1
            if args.submit_every and n % args.submit_every == 0:
                kind, t0 = "submit", time.perf_counter()
                r = await c.post("/jobs", json={"spec": spec})
                if r.status_code == 201:
                    mine.append(r.json()["id"])
            else:
                # mostly the long-running job; now and then one of this client's own
                target = mine[-1] if mine and n % 3 == 0 else job_id
                kind, t0 = "status", time.perf_counter()
                r = await c.get(f"/jobs/{target}/status" if args.endpoint == "status" else f"/jobs/{target}")
            ms = (time.perf_counter() - t0) * 1000
            stats["sent"].append(1)
            if time.monotonic() >= start:  # measured (not warm-up)
                stats[kind].append(ms)
                if ms > TARGET_P99_MS:
                    stats["slow"].append((round(time.monotonic() - start, 1), kind, round(ms)))
            if r.status_code >= 400:
                stats["errors"].append(f"{kind} {r.status_code}: {r.text[:120]}")
            if args.interval > 0 and time.monotonic() < deadline:
                await asyncio.sleep(args.interval * rng.uniform(0.5, 1.5))


async def load_phase(base: str, keys: list[str], job_id: str, args: argparse.Namespace) -> dict[str, list]:
    stats: dict[str, list] = {"status": [], "submit": [], "errors": [], "slow": [], "sent": []}
    start = time.monotonic() + args.warmup  # requests before `start` warm up the server and are not kept
    deadline = start + args.seconds
    await asyncio.gather(
        *(client_loop(i, base, keys[i], job_id, start, deadline, args, stats) for i in range(args.clients))
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0, help="Measured seconds of load.")
    ap.add_argument("--warmup", type=float, default=3.0, help="Seconds of load before measuring.")
    ap.add_argument("--interval", type=float, default=0.25, help="Seconds between a client's requests.")
    ap.add_argument("--submit-every", type=int, default=10, help="Every n-th request submits a job.")
    ap.add_argument(
        "--endpoint",
        choices=["status", "job"],
        default="status",
        help="poll GET /jobs/{id}/status (what the client's wait uses) or the full GET /jobs/{id}",
    )
    ap.add_argument("--long-prompts", type=int, default=1000, help="Prompts in the long-running job.")
    ap.add_argument(
        "--worker-threads", type=int, default=0, help="Torch threads of the CPU worker (0 = torch's default)."
    )
    ap.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="Run the worker at this nice level (CPU priority below the API).",
    )
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 500 and 0 < args.seconds <= 600):
        ap.error("--clients must be 1..500 and --seconds 0..600")

    from crosspatch.app.config import Settings
    from crosspatch.app.embedded import free_port
    from crosspatch.app.main import settings_env
    from crosspatch.app.services.users import bootstrap_users

    with tempfile.TemporaryDirectory(prefix="crosspatch-load-") as tmp:
        root = Path(tmp)
        pt, it = save_tiny_pair(root / "models")
        prompt_file = root / "models" / "long.jsonl"  # a big prompt set lives in a file, not inline
        prompt_file.write_text(
            "".join(
                json.dumps({"id": p["id"], "prompt": p["text"], "category": p["category"]}) + "\n"
                for p in prompts(args.long_prompts, seed=7)
            )
        )
        settings = Settings(
            data_dir=root / "data",
            model_roots=[root / "models"],
            log_level="WARNING",
            max_active_jobs_per_user=1000,
            _env_file=None,  # type: ignore[call-arg]
        )
        names = {"root": "admin", **{f"r{i:02d}": "researcher" for i in range(args.clients)}}
        keys = bootstrap_users(settings, names)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
        serve_cmd = [
            sys.executable,
            "-c",
            "from crosspatch.app.cli import main; main()",
            "serve",
            "--no-worker",
        ]
        server = subprocess.Popen([*serve_cmd, "--host", "127.0.0.1", "--port", str(port)], env=env)
        worker = None
        try:
            wait_up(url, server)
            api = f"{url}/api/v1"
            with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {keys['root']}"}) as admin:
                r = admin.post(
                    "/pairs", json={"pair_id": "tiny-llama", "family": "llama", "pt": str(pt), "it": str(it)}
                )
                r.raise_for_status()
                long_spec = tiny_sweep_spec(chunk_size=4, n_resamples=200, prompt_file=str(prompt_file))
                r = admin.post("/jobs", json={"spec": long_spec, "priority": 100})
                r.raise_for_status()
                job_id = r.json()["id"]
                threads = {"OMP_NUM_THREADS": str(args.worker_threads)} if args.worker_threads else {}
                nice = ["nice", "-n", str(args.worker_nice)] if args.worker_nice else []
                worker = subprocess.Popen(
                    [*nice, sys.executable, "-m", "crosspatch.app.worker", "--device", "cpu"],
                    env={**env, **threads},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                deadline = time.monotonic() + 120
                while admin.get(f"/jobs/{job_id}").json()["status"] != "running":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the long job never started")
                    time.sleep(0.2)
                time.sleep(2.0)  # let the worker load the pair and get into its forward passes
                before = admin.get(f"/jobs/{job_id}").json()
                # This process imported torch and transformers to build the pair: without a freeze, a
                # full collection of that heap pauses every client at once (and reads as server latency).
                gc.collect()
                gc.freeze()
                t0, server_cpu0, client_cpu0 = time.monotonic(), cpu_seconds(server.pid), time.process_time()
                stats = asyncio.run(
                    load_phase(api, [keys[f"r{i:02d}"] for i in range(args.clients)], job_id, args)
                )
                elapsed = time.monotonic() - t0
                server_cpu = cpu_seconds(server.pid) - server_cpu0
                client_cpu = time.process_time() - client_cpu0
                after = admin.get(f"/jobs/{job_id}").json()
        finally:
            for proc in (worker, server):
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()

    total = len(stats["status"]) + len(stats["submit"])
    p99 = percentile(stats["status"], 99)
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {sys.platform}")
    print(
        f"load: {args.clients} clients x {args.seconds:.0f} s, interval {args.interval} s, "
        f"a submit every {args.submit_every} requests; SQLite + DuckDB; 1 worker on CPU"
    )
    print(
        f"requests: {total} measured in {args.seconds:.0f} s ({total / args.seconds:.0f}/s) after "
        f"{args.warmup:.0f} s of warm-up, errors: {len(stats['errors'])}"
    )
    print(
        f"CPU: server {server_cpu:.1f} s ({1000 * server_cpu / max(len(stats['sent']), 1):.1f} ms/request), "
        f"clients {client_cpu:.1f} s, over {elapsed:.1f} s on {os.cpu_count()} cores"
    )
    print(describe("status", stats["status"]))
    print(describe("submit", stats["submit"]))
    print(
        f"long job: {before['status']} {before['progress'].get('fraction', 0):.2f} -> "
        f"{after['status']} {after['progress'].get('fraction', 0):.2f} during the load"
    )
    windows = sorted({int(t) for t, _, _ in stats["slow"]})
    print(f"requests over {TARGET_P99_MS:.0f} ms: {len(stats['slow'])}, in seconds {windows} of the run")
    for e in stats["errors"][:5]:
        print("  error:", e)
    ok = p99 < TARGET_P99_MS and not stats["errors"]
    print(f"target status p99 < {TARGET_P99_MS:.0f} ms: {'met' if ok else 'MISSED'} (p99 {p99:.1f} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
