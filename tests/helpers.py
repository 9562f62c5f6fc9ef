"""Builders shared by the tests: a word-level tokenizer, tiny PT/IT pairs, prompt records (all from
`crosspatch.engine.organisms.tiny`, which benchmarks import too), and waiting for a child's marker file."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from crosspatch.engine.organisms.tiny import (
    perturbed_copy,
    random_prompts,
    save_tiny_pair,
    tiny_pair,
    word_tokenizer,
)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
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
