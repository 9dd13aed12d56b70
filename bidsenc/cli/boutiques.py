"""The Boutiques descriptor (schema 0.5) of ``bidsenc``, generated from its argument parser.

``python -m bidsenc.cli.boutiques > descriptor.json`` rewrites the repository's
descriptor; a test keeps the two identical, so CBRAIN and ``bosh`` see exactly the
options the command line has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import __version__
from .parser import build_parser

IMAGE = "bidsenc/bidsenc"

_POSITIONAL = {
    "bids_dir": ("BIDS dataset", "File", False),
    "output_dir": ("Output folder", "String", False),
    "analysis_level": ("Analysis level", "String", False),
}


#: Path options that name folders bidsenc creates: strings, not inputs a platform must provide.
_FOLDERS_WRITTEN = {"work_dir", "feature_cache", "bids_database_dir"}


def build_descriptor(parser: argparse.ArgumentParser | None = None) -> dict:
    """The descriptor as a dictionary: one input per option of the parser, in its order."""
    parser = parser or build_parser()
    inputs, keys = [], []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        entry = _input(action)
        inputs.append(entry)
        keys.append(entry["value-key"])
    return {
        "name": "bidsenc",
        "tool-version": __version__,
        "description": parser.description,
        "schema-version": "0.5",
        "command-line": "bidsenc " + " ".join(keys),
        "container-image": {"type": "docker", "image": f"{IMAGE}:{__version__}", "entrypoint": True,
                            "container-opts": ["--gpus", "all"]},
        "inputs": inputs,
        "output-files": [{"id": "output_dataset", "name": "BIDS-Derivatives dataset",
                          "description": "maps, tables, reports and logs", "path-template": "[OUTPUT_DIR]",
                          "optional": False}],
        "suggested-resources": {"cpu-cores": 4, "ram": 32, "walltime-estimate": 14400},
        "error-codes": [
            {"code": 1, "description": "internal error; a crash file is written under output_dir/logs"},
            {"code": 16, "description": "bids_dir fails BIDS validation"},
            {"code": 17, "description": "unknown analysis level"},
            {"code": 18, "description": "labels or filters select no data"},
            {"code": 64, "description": "usage error"},
            {"code": 65, "description": "malformed data"},
            {"code": 66, "description": "required input missing"},
            {"code": 73, "description": "output cannot be created"},
            {"code": 74, "description": "I/O error"},
            {"code": 75, "description": "temporary failure (e.g. --device cuda with no GPU visible)"},
        ],
        "tags": {"domain": ["neuroinformatics", "fmri", "bids", "encoding-models"]},
        "custom": {"BIDSApplicationVersion": "1.0", "GPU": "docker --gpus all, or singularity --nv"},
    }


def _input(action: argparse.Action) -> dict:
    name = action.dest
    key = f"[{name.upper()}]"
    if not action.option_strings:
        title, kind, optional = _POSITIONAL[name]
        entry = {"id": name, "name": title, "type": kind, "value-key": key, "optional": optional,
                 "description": action.help}
        if name == "analysis_level":
            entry["value-choices"] = ["participant", "group"]
        return entry
    flag = next((o for o in action.option_strings if o.startswith("--") and "_" not in o), action.option_strings[0])
    # named after the flag, so that a ticked box does what it says (--no-reports: "No reports")
    entry = {"id": name, "name": flag.lstrip("-").replace("-", " ").capitalize(), "value-key": key, "optional": True,
             "command-line-flag": flag, "description": action.help}
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._CountAction):
        entry["type"] = "Flag"
        return entry
    if action.type is int or action.type is float:
        entry["type"] = "Number"
        entry["integer"] = action.type is int
    elif action.type is Path and name not in _FOLDERS_WRITTEN:
        entry["type"] = "File"
    else:
        entry["type"] = "String"
    if action.choices:
        entry["value-choices"] = list(action.choices)
    if action.nargs in ("+", "*"):
        entry["list"] = True
    return entry


def main() -> None:
    json.dump(build_descriptor(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
