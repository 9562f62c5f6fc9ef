"""Errors a user can cause. Each message says what was wrong and what would be right."""

from __future__ import annotations


class CrosspatchError(ValueError):
    """Base of every user-facing error raised by crosspatch (bad input, bad model, bad file)."""


class UnsupportedArchitectureError(CrosspatchError):
    """The model's architecture has no adapter."""


class TokenizerMismatchError(CrosspatchError):
    """PT and IT tokenizers give different ids on a prompt."""


class PromptFileError(CrosspatchError):
    """A prompt file is missing, empty, or has a malformed line."""


class ModelLoadError(CrosspatchError):
    """A model path or id could not be loaded."""


class NoopCheckError(CrosspatchError):
    """A runtime no-op check failed: the explicit stack or a splice does not reproduce the clean forward."""
