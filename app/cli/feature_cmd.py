"""`crosspatch feature FAMILY DICT LATENT`: one feature's page (top events with the token highlighted,
activation histogram, causal drop with CI, decoder logit-lens tokens, PT decoder share, gate).

From a running server (`GET /features/page/...`), else from the local results file (`--local`, or when no
server is reachable).
"""

from __future__ import annotations

import io
import json
import sys
from typing import Annotated, Any

import typer

from crosspatch.app.cli import cli
from crosspatch.app.cli.client_cmd import Json, Key, Url
from crosspatch.app.client import Client, ClientError


def _local_page(dictionary_id: str, latent: int, family: str, n_examples: int) -> dict[str, Any]:
    """The page from the local DuckDB file (refused with a clear error if a server holds it)."""
    from pathlib import Path

    from crosspatch.app.config import get_settings
    from crosspatch.app.services.features import feature_page
    from crosspatch.app.store.duckdb import ResultsStore

    path = get_settings().duckdb_path
    if path is None or not Path(path).is_file():
        raise ClientError(f"no results file at {path}; run a job first (crosspatch demo) or start a server")
    store = ResultsStore(path)
    try:
        return feature_page(store, dictionary_id, latent, family, n_examples=n_examples).model_dump()
    finally:
        store.close()


def _num(v: float | None, fmt: str = "+.3f") -> str:
    return "-" if v is None else format(v, fmt)


def render(page: dict[str, Any], width: int = 120) -> str:
    """The page as rich tables (plain text where the output is not a terminal); the token in ≪ ≫."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=width, record=True, file=io.StringIO())
    head = (
        f"feature {page['latent']} of {page['dictionary_id']} ({page.get('architecture') or '?'}, "
        f"layer {page.get('layer')}, family {page.get('family')})"
    )
    console.print(Text(head, style="bold"))
    gate = "passed" if page.get("gate_passed") else "unknown" if page.get("gate_passed") is None else "FAILED"
    console.print(
        f"fired on {page['n_events_active']} events; mean act IT-up {_num(page.get('mean_act_itup'), '.3f')}, "
        f"PT-up {_num(page.get('mean_act_ptup'), '.3f')}; attribution {_num(page.get('attribution'))}"
    )
    console.print(
        f"causal drop (held-out single-feature ablation) {_num(page.get('causal_drop'))} "
        f"[{_num(page.get('causal_drop_lo'))}, {_num(page.get('causal_drop_hi'))}] n={page.get('causal_n')}; "
        f"PT decoder share {_num(page.get('pt_decoder_share'), '.3f')}; gate {gate}"
    )
    if page.get("label"):
        console.print(f"label: {page['label']}")
    events = Table(title="top-activating events", show_lines=False)
    for col in ("act IT-up", "act PT-up", "split", "prompt", "context ≪token≫ next"):
        events.add_column(col)
    for e in page["examples"]:
        text = Text(e["context_before"][-80:])
        text.append(f"≪{e['token']}≫", style="bold reverse")
        text.append(f" {e['context_after']}", style="dim")
        events.add_row(
            _num(e["activation"], ".3f"),
            _num(e.get("activation_ptup"), ".3f"),
            str(e.get("split")),
            e["prompt_id"],
            text,
        )
    console.print(events)
    if page["histogram"]:
        peak = max(b["count"] for b in page["histogram"]) or 1
        hist = Table(title="activation histogram (IT-up, where it fired)")
        for col in ("from", "to", "count", ""):
            hist.add_column(col)
        for b in page["histogram"]:
            hist.add_row(
                f"{b['lo']:.3f}", f"{b['hi']:.3f}", str(b["count"]), "#" * round(30 * b["count"] / peak)
            )
        console.print(hist)
    lens = Table(title="decoder logit lens (W_dec row @ IT unembedding, no final norm)")
    for col in ("promotes", "logit", "suppresses", "logit "):
        lens.add_column(col)
    top, bottom = page["decoder_top_tokens"], page["decoder_bottom_tokens"]
    for i in range(max(len(top), len(bottom))):
        t = top[i] if i < len(top) else None
        b = bottom[i] if i < len(bottom) else None
        lens.add_row(
            t["token"] if t else "",
            _num(t["value"]) if t else "",
            b["token"] if b else "",
            _num(b["value"]) if b else "",
        )
    console.print(lens)
    if page["gate"]:
        gt = Table(title="dictionary quality gate")
        for col in ("check", "value", "threshold", "status"):
            gt.add_column(col)
        for c in page["gate"]:
            gt.add_row(
                c["name"], _num(c.get("value"), ".4g"), str(c.get("threshold") or ""), str(c.get("status"))
            )
        console.print(gt)
    return console.export_text(styles=sys.stdout.isatty())


@cli.command("feature")
def feature(
    family: Annotated[str, typer.Argument(help="The model family (e.g. llama).")],
    dictionary: Annotated[str, typer.Argument(help="The dictionary id.")],
    latent: Annotated[int, typer.Argument(min=0, help="The latent index.")],
    n_examples: Annotated[int, typer.Option(min=1, max=100, help="Top-activating events shown.")] = 10,
    local: Annotated[bool, typer.Option(help="Read the DuckDB file directly (no server).")] = False,
    url: Url = None,
    key: Key = None,
    as_json: Json = False,
) -> None:
    """One feature's page: top events (token highlighted), histogram, causal drop, logit lens, gate."""
    page = None
    if not local:
        try:
            with Client(url, key) as c:
                page = c.feature_page(dictionary, latent, family, n_examples)
        except ClientError as e:
            if e.status is not None or url:
                raise
            typer.echo("(no server reachable: reading the local results file)", err=True)
    if page is None:
        page = _local_page(dictionary, latent, family, n_examples)
    typer.echo(json.dumps(page, indent=2, default=str) if as_json else render(page))
