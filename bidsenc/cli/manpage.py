"""The ``bidsenc(1)`` manual page, generated from the argument parser by argparse-manpage.

``python -m bidsenc.cli.manpage > docs/bidsenc.1`` rewrites the repository's copy;
a test keeps the two identical, as it does for ``descriptor.json``, and the
container installs it so that ``man bidsenc`` works there. The exit-status
section is written from :mod:`bidsenc.errors`, the one place exit codes live.
"""

from __future__ import annotations

import os
import sys

from .. import __version__, errors
from .parser import build_parser

#: The page's date: the release it documents, so that the page changes only with the release.
RELEASE_DATE = "2026-12-01"

_EXAMPLES = r"""
.nf
bidsenc /data/ds003020 /out participant \-\-participant\-label UTS01 \-w /scratch/work
bidsenc /data/narratives /out participant \-d fmriprep=/data/narratives/derivatives/fmriprep \e
        \-\-space MNI152NLin2009cAsym \-\-task pieman
bidsenc /data/narratives /out group
bidsenc\-demo demo        # a generated dataset and tiny models, participant and group level
.fi
"""

_ENVIRONMENT = r"""
.TP
.B BIDSENC_MODEL_DIR
Local copies of hub models, found by id as \fIDIR/<org>/<name>\fR (like \fB\-\-model\-dir\fR).
.TP
.B HF_HOME
The Hugging Face cache where hub ids are looked up; nothing is downloaded without \fB\-\-allow\-download\fR.
"""

_FILES = r"""
.TP
.I output_dir/sub\-<label>/
Maps, tables and sidecars of each participant (BIDS-Derivatives).
.TP
.I output_dir/sub\-<label>.html, output_dir/group.html
Participant and group reports.
.TP
.I output_dir/logs/
The run's configuration (TOML, reusable with \fB\-\-config\-file\fR), log, discovered experiments and crash files.
"""


def _exit_status() -> str:
    """One entry per exit code, from the error classes' docstrings."""
    rows = [(0, "Success."), (1, "Internal error (the crash file under output_dir/logs/ is named), or an "
                                 "installed package that fails to import (named, with what to do).")]
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.BidsencError) and cls.exit_code != 1:
            rows.append((cls.exit_code, cls.__doc__.strip().splitlines()[0]))
    return "\n".join(f".TP\n.B {code}\n{text}" for code, text in sorted(set(rows)))


def build_manpage() -> str:
    """The manual page as roff text."""
    from argparse_manpage.manpage import Manpage

    parser = build_parser()
    # argparse wraps help text at the terminal's width; fix it so the page is the same everywhere
    # (man reflows the text anyway).
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _render(Manpage, parser)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _render(Manpage, parser) -> str:
    page = Manpage(parser, _data={"project_name": "bidsenc", "version": __version__, "date": RELEASE_DATE,
                                  "manual_title": "bidsenc manual",
                                  "description": "voxelwise encoding models of story-listening fMRI (a BIDS App)"})
    for heading, content in (("exit status", _exit_status()), ("environment", _ENVIRONMENT.strip()),
                             ("files", _FILES.strip()), ("examples", _EXAMPLES.strip()),
                             ("see also", r"\fBbidsenc\-demo\fR \-\-help; the README and docs/ of the project")):
        page.add_section(heading, "=", content)
    # A line starting with ' is a roff control line: help text that starts with a quote must not be one.
    return "".join("\\&" + line if line.startswith("'") else line for line in str(page).splitlines(True))


if __name__ == "__main__":
    sys.stdout.write(build_manpage())
