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


class BrokenPackageError(BidsencError):
    """An installed package fails to import: the installation, not bidsenc or the data, is at fault."""

    exit_code = 1


def broken_package(exc: BaseException) -> BrokenPackageError | None:
    """What to tell the user when ``exc`` was raised while importing an installed package, else None.

    A package that cannot be imported (a missing one, or one whose compiled library does not load,
    such as a torchaudio built for another torch) shows up deep inside some later step; the user
    needs its name and what to do, not the traceback. The package is the innermost one whose
    module-level code (``<module>``: code that runs on import) is on the traceback, or the module
    a ModuleNotFoundError names.
    """
    import traceback

    package = None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        parts = frame.filename.replace("\\", "/").split("/")
        marker = next((m for m in ("site-packages", "dist-packages") if m in parts[:-1]), None)
        if frame.name == "<module>" and marker:
            package = parts[parts.index(marker) + 1].removesuffix(".py")
            break
    if package in (None, "bidsenc") and isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
    if package in (None, "bidsenc"):
        return None
    distribution = _distribution_of(package)
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] == package:
        advice = f"install it (pip install {distribution}), or reinstall bidsenc with its dependencies"
    else:
        advice = (f"reinstall it (pip install --force-reinstall {distribution}); if bidsenc does not need it, "
                  f"uninstall it (pip uninstall {distribution}); the versions bidsenc was tested with are "
                  "in requirements/lock.txt")
    return BrokenPackageError(f"the installed package {distribution} fails to import ({reason}): {advice}")


def _distribution_of(module: str) -> str:
    from importlib.metadata import packages_distributions

    names = packages_distributions().get(module) or [module]
    return names[0]
