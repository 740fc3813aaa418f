"""User-facing errors of the index builder.

Anything a user can cause (a bad corpus line, an unwritable output, an index type
FAISS does not know, a mismatched checkpoint) raises ``BuildError`` with a message
that names the file and line where it can; the CLI prints it and exits with status 2,
without a traceback. ``VerifyError`` is a verification that ran and failed (status 1).
"""

from __future__ import annotations


class BuildError(ValueError):
    """A problem with the user's input or environment, with a precise message."""


class VerifyError(RuntimeError):
    """``verify`` found the index inconsistent with the checkpoint or its own manifest."""
