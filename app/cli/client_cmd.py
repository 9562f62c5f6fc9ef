"""Client commands against a running server: submit, status, wait, logs, results, top-features, cancel.

Server and key: --url/--key, else CROSSPATCH_URL / CROSSPATCH_API_KEY, else the client config file.
`--json` prints machine-readable output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from crosspatch.app.cli import cli
from crosspatch.app.client import Client, ClientError

Url = Annotated[str | None, typer.Option("--url", help="Server URL (default: CROSSPATCH_URL).")]
Key = Annotated[str | None, typer.Option("--key", help="API key (default: CROSSPATCH_API_KEY).")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _print(obj: object, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str) if as_json else text)


def _inline_prompts(path: Path) -> list[dict[str, str]]:
    from crosspatch.engine.prompts import load_prompts

    return [{"id": p.id, "text": p.text, "category": p.category} for p in load_prompts(path)]


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@cli.command("submit")
def submit(
    kind: Annotated[str, typer.Option(help="divergence, crosspatch, train_dictionary, ...")] = "crosspatch",
    pair: Annotated[str | None, typer.Option(help="Allow-listed pair id.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Local JSONL prompt file (sent inline).")] = None,
    boundary: Annotated[str | None, typer.Option(help="Layer index, comma list, or 'sweep'.")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="A whole job spec as a JSON file.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra spec field key=value (JSON value).")
    ] = None,
    priority: int = 0,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """Submit a job; prints its id."""
    spec: dict[str, Any] = json.loads(spec_file.read_text()) if spec_file else {"kind": kind}
    if pair:
        spec["pair_id"] = pair
    if prompts:
        spec["prompts"] = _inline_prompts(prompts)
    if boundary:
        spec["boundary"] = boundary if boundary == "sweep" else [int(b) for b in boundary.split(",")]
        if isinstance(spec["boundary"], list) and len(spec["boundary"]) == 1:
            spec["boundary"] = spec["boundary"][0]
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set {item!r}: expected key=value")
        spec[name] = _parse_value(value)
    with Client(url, key) as c:
        job = c.submit(spec, priority)
    _print(job, as_json, job["id"])


@cli.command("status")
def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; without it, list your jobs.")] = None,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """One job's status, or a list of your jobs."""
    with Client(url, key) as c:
        if job_id:
            job = c.job(job_id)
            p = job.get("progress") or {}
            text = f"{job['id']}  {job['kind']}  {job['status']}  {100 * p.get('fraction', 0):.0f}%  {p.get('message', '')}"
            if job.get("error"):
                text += f"\n  error: {job['error']}"
            _print(job, as_json, text)
        else:
            jobs = c.jobs(mine=True)
            lines = [f"{j['id']}  {j['kind']:<16} {j['status']:<10} {j['created_at']}" for j in jobs["data"]]
            _print(jobs, as_json, "\n".join(lines) or "no jobs")


@cli.command("wait")
def wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """Wait for a job to finish, with a progress bar; exits 1 unless it succeeded."""
    with Client(url, key) as c:
        if as_json:
            job = c.wait(job_id, timeout)
        else:
            with typer.progressbar(length=1000, label=job_id[:8]) as bar:
                done = [0]

                def show(j: dict[str, Any]) -> None:
                    target = int(1000 * (j.get("progress") or {}).get("fraction", 0))
                    if target > done[0]:
                        bar.update(target - done[0])
                        done[0] = target

                job = c.wait(job_id, timeout, on_progress=show)
    _print(job, as_json, f"{job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@cli.command("logs")
def logs(job_id: str, url: Url = None, key: Key = None, as_json: Json = False) -> None:
    """A job's log lines."""
    with Client(url, key) as c:
        data = c.logs(job_id)
    _print(
        data, as_json, "\n".join(f"{r['created_at']} {r['level']:<7} {r['message']}" for r in data["data"])
    )


@cli.command("results")
def results(
    job_id: str,
    table: Annotated[
        str, typer.Option(help="cells, summaries, events, feature_acts, feature_effects")
    ] = "summaries",
    out: Annotated[Path | None, typer.Option(help="Download as Parquet to this file.")] = None,
    limit: int = 10_000,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """A finished job's results table (printed, or downloaded as Parquet with --out)."""
    with Client(url, key) as c:
        if out is not None:
            c.results_parquet(job_id, table, out, limit)
            _print({"path": str(out)}, as_json, f"wrote {out}")
            return
        data = c.results(job_id, table, limit)
    _print(data, as_json, _table_text(data["data"]))


@cli.command("top-features")
def top_features(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    dictionary: Annotated[str | None, typer.Option(help="Only this dictionary id.")] = None,
    layer: Annotated[int | None, typer.Option(help="Only latents of this layer.")] = None,
    min_events: Annotated[int, typer.Option(help="Only features scored on at least this many events.")] = 0,
    limit: int = 50,
    include_failed_gate: Annotated[
        bool, typer.Option(help="Also list features of dictionaries that failed the quality gate.")
    ] = False,
    local: Annotated[bool, typer.Option(help="Read the DuckDB file directly (no server).")] = False,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """Top mediating features: fit-split attribution, held-out ablation drop [95% CI] over n events, gate."""
    filters = dict(
        family=family,
        dictionary_id=dictionary,
        layer=layer,
        min_events=min_events,
        limit=limit,
        include_failed_gate=include_failed_gate,
    )
    data = None
    if not local:
        try:
            with Client(url, key) as c:
                data = c.top_features(**filters)
        except ClientError as e:
            if e.status is not None or url:
                raise
            typer.echo("(no server reachable: reading the local results file)", err=True)
    if data is None:
        data = _local_query("top_features", filters)
    _print(data, as_json, _table_text(data["data"]))


def _local_query(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a fixed query on the local DuckDB file (refused with a clear error if a server holds it)."""
    from crosspatch.app.config import get_settings
    from crosspatch.app.store.duckdb import ResultsStore

    path = get_settings().duckdb_path
    if path is None or not Path(path).is_file():
        raise ClientError(f"no results file at {path}; run a job first (crosspatch demo) or start a server")
    store = ResultsStore(path)
    try:
        rows = store.query(name, **params).to_pylist()
    finally:
        store.close()
    return {"table": name, "data": rows, "count": len(rows)}


@cli.command("cancel")
def cancel(job_id: str, url: Url = None, key: Key = None, as_json: Json = False) -> None:
    """Cancel a job (yours, or any as admin)."""
    with Client(url, key) as c:
        job = c.cancel(job_id)
    _print(job, as_json, f"{job['id']} {job['status']}")


def _table_text(rows: list[dict[str, Any]], max_rows: int = 50) -> str:
    if not rows:
        return "(no rows)"
    cols = [k for k in rows[0] if not isinstance(rows[0][k], list)]

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {k: max(len(k), *(len(fmt(r[k])) for r in rows[:max_rows])) for k in cols}
    lines = ["  ".join(k.ljust(widths[k]) for k in cols)]
    lines += ["  ".join(fmt(r[k]).ljust(widths[k]) for k in cols) for r in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows (use --json or --out)")
    return "\n".join(lines)
