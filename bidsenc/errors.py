"""Errors that end a run with a documented exit code.

Each error carries one line that says what is wrong and what to do; the CLI
prints it and exits with ``exit_code`` (BIDS-Apps execution spec / sysexits).
Any other exception is a bug: the CLI writes a crash file and exits 1.
"""

from __future__ import annotations


class BidsencError(Exception):
    """Base class: a problem the user can fix, with its exit code."""

    exit_code = 1

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # one line, whatever a library's text brought along
        super().__init__(message)
        self.message = message


class InvalidBidsError(BidsencError):
    """The input dataset failed BIDS validation."""

    exit_code = 16


class AnalysisLevelError(BidsencError):
    """Unknown analysis level."""

    exit_code = 17


class NoDataSelectedError(BidsencError):
    """Labels or filters selected nothing."""

    exit_code = 18


class UsageError(BidsencError):
    """Bad command line or configuration."""

    exit_code = 64


class DataError(BidsencError):
    """Malformed input data: events, word timings, BOLD, sidecars."""

    exit_code = 65


class MissingInputError(BidsencError):
    """A required input is absent."""

    exit_code = 66


class OutputError(BidsencError):
    """An output file or folder cannot be created."""

    exit_code = 73


class IOFailure(BidsencError):
    """Reading or writing failed part-way (disk full, device error)."""

    exit_code = 74


class TemporaryFailure(BidsencError):
    """A transient failure (e.g. GPU busy); a rerun may succeed."""

    exit_code = 75
