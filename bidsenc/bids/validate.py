"""Run the official BIDS validator (``bids-validator-deno``) on the input dataset."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import InvalidBidsError

log = logging.getLogger(__name__)

#: Issue codes that do not matter to bidsenc: stimuli are resolved by bidsenc itself,
#: and sidecar/events hygiene of unused tasks does not change the analysis.
IGNORED_CODES = frozenset({
    "STIMULUS_FILE_MISSING",
    "FILE_NOT_CHANGED",
    "EVENTS_TSV_MISSING",
    "SIDECAR_KEY_RECOMMENDED",
    "TSV_ADDITIONAL_COLUMNS_UNDEFINED",
    "README_FILE_MISSING",
    "NOT_INCLUDED",
})


def _validator() -> str | None:
    name = "bids-validator-deno"
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def validate_bids(bids_dir: Path) -> None:
    """Raise :class:`InvalidBidsError` when ``bids_dir`` has validation errors that matter.

    A missing validator is tolerated with a warning (``--skip-bids-validation`` silences it).
    """
    exe = _validator()
    if exe is None:
        log.warning("bids-validator-deno is not installed: skipping BIDS validation")
        return
    proc = subprocess.run(
        [exe, "--format", "json", "--ignoreWarnings", str(bids_dir)],
        capture_output=True, text=True, check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        log.warning("the BIDS validator gave no readable report (%s); continuing without it",
                    (proc.stderr.strip().splitlines() or ["no output"])[-1])
        return
    errors = [
        issue for issue in report.get("issues", {}).get("issues", [])
        if issue.get("severity") == "error" and issue.get("code") not in IGNORED_CODES
    ]
    if errors:
        first = errors[0]
        where = first.get("location", "")
        codes = sorted({e.get("code") for e in errors})
        raise InvalidBidsError(
            f"{bids_dir} fails BIDS validation ({len(errors)} error(s): {', '.join(codes)}; "
            f"first: {first.get('code')} at {where or 'dataset'}); fix the dataset, "
            "or pass --skip-bids-validation to proceed at your own risk"
        )
    log.info("BIDS validation passed (BIDS schema %s)", report.get("summary", {}).get("schemaVersion", "?"))
