"""`crosspatch admin ...`: users, keys and the pair allow-list, straight on the job store.

Run on the server host (it opens the job store from CROSSPATCH_DATABASE_URL, migrating it first).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from crosspatch.app.cli import cli
from crosspatch.app.config import get_settings
from crosspatch.app.services import pairs, users
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.session import Store

admin = typer.Typer(
    help="Users, API keys and allowed model pairs (run on the server host).", no_args_is_help=True
)
cli.add_typer(admin, name="admin")


def _store() -> Store:
    settings = get_settings()
    assert settings.database_url is not None
    upgrade(settings.database_url)
    return Store.from_settings(settings)


@admin.command("create-user")
def create_user(
    name: str,
    role: Annotated[str, typer.Option(help="admin or researcher")] = "researcher",
    with_key: Annotated[bool, typer.Option("--with-key", help="Also create and print an API key.")] = False,
) -> None:
    """Add a user (and optionally a first key)."""
    if role not in ("admin", "researcher"):
        raise typer.BadParameter("role must be 'admin' or 'researcher'")
    store = _store()
    with store.session() as s:
        user = users.create_user(s, name, role)
        typer.echo(f"created {role} {user.name} (id {user.id})")
        if with_key:
            _, key = users.create_key(s, name)
            typer.echo(f"API key (shown once, store it now): {key}")


@admin.command("create-key")
def create_key(
    name: str, label: Annotated[str, typer.Option(help="A note on what the key is for.")] = ""
) -> None:
    """Create an API key for an existing user; it is printed once and stored only as a hash."""
    store = _store()
    with store.session() as s:
        row, key = users.create_key(s, name, label)
        typer.echo(f"key id {row.id} for {name}")
        typer.echo(f"API key (shown once, store it now): {key}")


@admin.command("revoke-key")
def revoke_key(key_id: int) -> None:
    """Revoke an API key by id."""
    store = _store()
    with store.session() as s:
        row = users.revoke_key(s, key_id)
        typer.echo(f"revoked key {row.id} (prefix {row.prefix})")


@admin.command("list-users")
def list_users() -> None:
    """Users and their keys (prefixes only)."""
    store = _store()
    with store.session(write=False) as s:
        for u in users.list_users(s):
            keys = [
                f"{k.id}:{k.prefix}{' (revoked)' if k.revoked_at else ''}" for k in users.list_keys(s, u.name)
            ]
            typer.echo(f"{u.name:<20} {u.role:<10} keys: {', '.join(keys) or '-'}")


@admin.command("add-pair")
def add_pair(
    pair_id: str,
    pt: Annotated[str, typer.Option(help="PT model: hub id or a local directory under the model roots.")],
    it: Annotated[str, typer.Option(help="IT model: hub id or a local directory under the model roots.")],
    family: Annotated[str, typer.Option(help="Family name shown in results.")],
    n_layers: Annotated[
        int | None, typer.Option(help="Depth (read from config.json for local models).")
    ] = None,
    default_boundary: Annotated[int | None, typer.Option(help="Default first late block.")] = None,
    pt_revision: Annotated[str | None, typer.Option(help="Hub commit of PT.")] = None,
    it_revision: Annotated[str | None, typer.Option(help="Hub commit of IT.")] = None,
) -> None:
    """Allow-list a PT/IT pair for researchers."""
    store = _store()
    with store.session() as s:
        pair = pairs.add_pair(
            s,
            get_settings(),
            pair_id=pair_id,
            family=family,
            pt=pt,
            it=it,
            n_layers=n_layers,
            default_boundary=default_boundary,
            pt_revision=pt_revision,
            it_revision=it_revision,
        )
        typer.echo(
            json.dumps(
                {
                    "pair_id": pair.pair_id,
                    "n_layers": pair.n_layers,
                    "default_boundary": pair.default_boundary,
                }
            )
        )
