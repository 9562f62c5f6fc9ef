"""Builders shared by the tests: a word-level tokenizer, tiny PT/IT pairs, prompt records (all from
`crosspatch.engine.organisms.tiny`, which benchmarks import too), and waiting for a child's marker file."""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from crosspatch.engine.organisms.tiny import (
    perturbed_copy,
    random_prompts,
    save_tiny_pair,
    tiny_pair,
    word_tokenizer,
)

if TYPE_CHECKING:
    from crosspatch.engine.divergence import DivergenceEvent
    from crosspatch.engine.pairs import ModelPair


@functools.cache
def _organism_events(name: str, limit: int | None) -> tuple[Path, ModelPair, tuple[DivergenceEvent, ...]]:
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.organisms import organism_path
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.prompts import load_prompts

    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it")
    return root, pair, tuple(find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=limit)))


def organism_events(
    name: str, limit: int | None = None, diverged_only: bool = True
) -> tuple[Path, ModelPair, list[DivergenceEvent]]:
    """(directory, pair, divergence events) of organism `name` on its first `limit` prompts, the diverged
    ones unless `diverged_only=False`; loaded and computed once per test process."""
    root, pair, events = _organism_events(name, limit)
    return root, pair, [e for e in events if e.diverged or not diverged_only]


PAPER_SIZED = "llama_paper_sized"


def paper_sized(limit: int) -> tuple[ModelPair, list[DivergenceEvent]]:
    """(pair, diverged events) of the `llama_paper_sized` organism on its first `limit` prompts."""
    _root, pair, events = organism_events(PAPER_SIZED, limit=limit)
    return pair, events


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `crosspatch ARGS` in process; (exit code, stdout, stderr)."""
    from crosspatch.app.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `crosspatch ARGS` in process, assert it succeeded (stderr as the message); its stdout."""
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    return out


# seconds: the bound on any one wait for a child process or a job. Only a broken build waits this long; a
# loaded 2-core machine (parallel workers, other jobs) can take minutes where an idle one takes seconds.
BOUND = 600.0


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = BOUND) -> None:
    """Wait until a child process creates `path` (its signal that it reached a known point, e.g. held
    before a kill); fail at once if the child exits first. The timeout only bounds a broken child."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before writing {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child did not write {path} within {timeout} s")
        time.sleep(0.02)


__all__ = [
    "perturbed_copy",
    "random_prompts",
    "save_tiny_pair",
    "tiny_pair",
    "wait_for_file",
    "word_tokenizer",
]
