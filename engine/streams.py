"""Batch streams: progress after each consumed batch, and a stream run to the end as whole tables.

The engine's `iter_*` functions yield one table (or tuple of tables) per batch of events, for the worker's
checkpoints; their whole-table twins are `whole(iter_*, gather)`, so the two share one signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ParamSpec, Protocol, TypeVar

import pyarrow as pa

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")


class EventBatch(Protocol):
    """A batch tuple led by its events (`engine.crosspatch.event_batches`' items)."""

    def __getitem__(self, i: int, /) -> Sequence[object]: ...


B = TypeVar("B", bound=EventBatch)


def reported(batches: Iterable[B], total: int, on_batch: Callable[[int, int], None] | None) -> Iterator[B]:
    """`batches` one by one; `on_batch(done events, total)` once the consumer is done with each."""
    done = 0
    for batch in batches:
        yield batch
        done += len(batch[0])
        if on_batch:
            on_batch(done, total)


def gathered(parts: Sequence[pa.Table], schema: pa.Schema, sort: Sequence[str] = ()) -> pa.Table:
    """The batches' tables as one (`schema`'s empty table when there are none), sorted ascending by `sort`."""
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.sort_by([(c, "ascending") for c in sort]) if sort else table


def whole(
    name: str, stream: Callable[P, Iterable[T]], gather: Callable[[list[T]], R], doc: str
) -> Callable[P, R]:
    """Function `name` of `stream`'s arguments: runs it to the end and returns `gather` of its batches."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return gather(list(stream(*args, **kwargs)))

    run.__name__ = run.__qualname__ = name
    run.__module__ = stream.__module__
    run.__doc__ = f"{doc} Takes `{stream.__name__}`'s arguments."
    return run
