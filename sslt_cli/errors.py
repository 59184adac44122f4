"""Errors that reach the user as one clear message (what, where, the bad value, what to do).

The CLI catches :class:`SsltError` and prints it without a traceback, exit code 1.
Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class SsltError(Exception):
    """A problem the user can fix: bad input, missing files, a bad recipe."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def render(self) -> str:
        """The message, then one bullet per problem."""
        lines = [self.message]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class RecipeError(SsltError):
    """A recipe (or an override) does not validate; ``problems`` lists every issue found."""


class DataError(SsltError):
    """Input data is missing, unreadable or in a format sslt cannot use."""


class CheckpointError(SsltError):
    """A file is not a checkpoint sslt can load, or its keys do not match the model."""


class TrainingError(SsltError):
    """Training cannot continue (e.g. a NaN or inf loss); the last good checkpoint stays intact."""
