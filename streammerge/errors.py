"""Typed errors. The library raises these; only the CLI turns them into a message and exit status 2.

Every message is meant to be printed as one line: it names the file or tensor, says what was
expected and what was found, and says what to do. Arguments are named in library terms, in
backticks (`` `max_memory` ``, `` `adapters` ``); the command line replaces each with its flag
(``--max-memory``, ``--adapter``). An error that gathers several problems (an adapter that does not
fit the base) has a one-line summary as its message and the problems, one line each, in ``problems``.
"""

from __future__ import annotations

from collections.abc import Sequence


class StreamMergeError(Exception):
    """Base class of every error streammerge raises on bad input or a failed environment."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.summary = message
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join([self.summary, *(f"  {p}" for p in self.problems)])


class CheckpointError(StreamMergeError):
    """The base checkpoint is missing, corrupt, truncated, quantized or otherwise unusable."""


class AdapterError(StreamMergeError):
    """The adapter directory, its config or its tensors are missing, corrupt or inconsistent."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature streammerge refuses to merge (named in the message)."""


class PlanError(StreamMergeError):
    """The adapter does not fit the base: shapes, missing targets, conflicting options."""


class OutputError(StreamMergeError):
    """The output path is unusable: exists, aliases an input, is not writable, or the disk is full."""


class BudgetError(PlanError):
    """The memory budget is smaller than the plan's minimum working set."""


class NonFiniteError(StreamMergeError):
    """A NaN or inf appeared in an adapter tensor or a merged result."""
