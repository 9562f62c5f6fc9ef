"""Progress bars for long CLI work (`run`, `dict cache`, `dict train`, `mediate`), on stderr, terminals only.

A bar is drawn only when stderr is a terminal (or `CROSSPATCH_PROGRESS=1` forces it; `=0` turns it off), so
logs, pipes and CI output stay plain. Commands get a `Bar` with `update(done, total=None, note=None)` and
`enabled` (to keep their plain progress lines when there is no bar).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from crosspatch.engine.divergence import DivergenceEvent
    from crosspatch.engine.pairs import ModelPair
    from crosspatch.engine.prompts import PromptRecord


def progress_enabled(stream: TextIO | None = None) -> bool:
    """True when progress bars should draw: `CROSSPATCH_PROGRESS` if set, else whether stderr is a tty."""
    forced = os.environ.get("CROSSPATCH_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Bar:
    """One task of a rich progress display (a no-op when disabled)."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    @property
    def enabled(self) -> bool:
        return self._progress is not None

    def update(self, done: float, total: float | None = None, note: str | None = None) -> None:
        """Set the completed amount (and total / trailing note when given)."""
        if self._progress is None or self._task is None:
            return
        kw: dict[str, Any] = {"completed": done}
        if total is not None:
            kw["total"] = total
        if note is not None:
            kw["note"] = note
        self._progress.update(self._task, **kw)


@contextmanager
def progress_bar(
    description: str,
    total: float | None = None,
    *,
    enabled: bool | None = None,
    console: Console | None = None,
) -> Iterator[Bar]:
    """A rich progress bar on stderr for the block; `total=None` until known (an indeterminate bar)."""
    if not (progress_enabled() if enabled is None else enabled):
        yield Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console or Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, note="")
        yield Bar(progress, task)


def divergences_with_bar(
    pair: ModelPair,
    records: Sequence[PromptRecord],
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool,
    event: str = "first_diff",
    capture: Sequence[int] | None = None,
) -> list[DivergenceEvent]:
    """First divergence of every prompt, batch by batch, under a "first divergence" bar (`run`, `mediate`).

    `capture`: boundaries kept for the fused 2x2 (`run`), first_diff events only.
    """
    from crosspatch.engine.divergence import iter_divergences

    with progress_bar("first divergence", len(records)) as bar:
        return [
            e
            for batch in iter_divergences(
                pair,
                records,
                max_new_tokens,
                batch_size,
                chat_template,
                on_batch=lambda d, n: bar.update(d, n),
                event=event,
                capture=capture if event == "first_diff" else None,
            )
            for e in batch
        ]
