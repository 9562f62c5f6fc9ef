"""`crosspatch cache ls`: the shared cache of dictionaries, activation caches and residuals (what, for whom).

Through the server by default (the caller's key sees their own entries and those of jobs shared with
the lab; admins all); `--local` reads the job store on the server host directly (every entry).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from crosspatch.app.cli import cli
from crosspatch.app.cli.client_cmd import Json, Key, Url
from crosspatch.app.client import Client

cache = typer.Typer(
    help="The shared cache of computed states (dictionaries, activation caches, residuals).",
    no_args_is_help=True,
)
cli.add_typer(cache, name="cache")


def _local_entries(pair_id: str | None) -> list[dict[str, Any]]:
    """Every entry in the job store of CROSSPATCH_DATABASE_URL (server host; as an admin sees them)."""
    from crosspatch.app.config import get_settings
    from crosspatch.app.services.cache import list_entries
    from crosspatch.app.store.migrate import upgrade
    from crosspatch.app.store.models import User
    from crosspatch.app.store.session import Store

    settings = get_settings()
    assert settings.database_url is not None
    upgrade(settings.database_url)
    store = Store.from_settings(settings)
    try:
        with store.session(write=False) as s:
            return list_entries(s, User(id=None, name="(local)", role="admin"), pair_id)
    finally:
        store.dispose()


@cache.command("ls")
def ls(
    pair: Annotated[str | None, typer.Option("--pair", help="Only this pair's entries.")] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Read the job store directly (server host).")
    ] = False,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """List cached entries: key, kind, pair, owner, source job, size, hits, last use."""
    if local:
        rows = _local_entries(pair)
    else:
        with Client(url, key) as c:  # a refusal or an unreachable server: one line (ClientError)
            rows = c.cache(pair)["data"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    typer.echo(
        f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, {sum(r['size_bytes'] for r in rows)} bytes"
    )
    for r in rows:
        typer.echo(
            f"{r['key'][:12]}  {r['kind']:<10} {r['pair_id'] or '-':<16} owner {r['owner_id']!s:<4} "
            f"job {str(r['job_id'])[:8]}  {r['size_bytes']:>10} B  hits {r['hits']:<3} last used {r['last_used_at']}"
        )
