"""What an installation needs, and what happens when an installed package is broken.

A dependency that breaks on import (a compiled library that does not load, as torchaudio 2.11.1's
did against torch 2.11.0) must end a run with one line naming the package and what to do, not a
traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def _broken_package(site: Path, name: str, version: str = "2.11.1") -> None:
    """A package that is installed (with metadata) but whose import fails as a bad compiled library does."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(
        f"raise OSError('Could not load this library: {site}/{name}/lib/lib{name}.so: undefined symbol: "
        "torch_exception_get_what_without_backtrace')\n")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text("")


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HOME": str(cwd)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_torchaudio_is_neither_required_nor_imported():
    assert not any(r.lower().startswith("torchaudio") for r in requires("bidsenc") or [])
    code = ("import sys, bidsenc.bids.audio as a, bidsenc.features.audio, bidsenc.workflow, bidsenc.cli.run;"
            f"x, r = a.load_audio({str(DATA / 'jfk.flac')!r}, 16000); assert r == 16000 and len(x) == 176000;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchaudio'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_broken_resampler_is_named_and_needed_only_to_resample(tmp_path):
    site = tmp_path / "site-packages"
    _broken_package(site, "soxr", "1.1.0")
    code = ("from bidsenc.bids.audio import load_audio\n"
            "from bidsenc.errors import broken_package\n"
            f"x, r = load_audio({str(DATA / 'jfk.flac')!r}, 44100)\n"  # the file's own rate: no soxr
            "print('native', r, len(x))\n"
            "try:\n"
            f"    load_audio({str(DATA / 'jfk.flac')!r}, 16000)\n"
            "except Exception as err:\n"
            "    print(broken_package(err).message)\n")
    proc = _run(["-c", code], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    native, message = proc.stdout.strip().splitlines()
    assert native == "native 44100 485100"
    assert message.startswith("the installed package soxr fails to import (OSError: Could not load this library")
    assert "pip install --force-reinstall soxr" in message


def test_a_broken_compiled_library_ends_the_run_with_one_line_naming_it(tmp_path, demo):
    """A compiled library that does not load must end a run with one line naming it and what to do.

    The library is one bidsenc itself imports part-way through a run: soxr, imported by
    ``load_audio`` when a stimulus is not at the rate wanted (here 32 kHz, resampled to 16 kHz
    for ``lowlevel:envelope``), long after the run has started and its logs exist.
    """
    import soundfile as sf

    root, _ = demo
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds, copy_function=os.link)  # hard links: files are replaced, never written
    for wav in sorted((ds / "stimuli").glob("*.wav")):
        samples, rate = sf.read(wav, dtype="int16")
        assert rate == 16000
        wav.unlink()
        sf.write(wav, np.repeat(samples, 2, axis=0), 2 * rate, subtype="PCM_16")  # same duration at 32 kHz
    site = tmp_path / "site-packages"
    _broken_package(site, "soxr", "1.1.0")
    proc = _run(["-m", "bidsenc.cli.run", str(ds), str(tmp_path / "out"), "participant",
                 "--participant-label", "01", "--skip-bids-validation", "--features-only",
                 "--feature", "lowlevel:envelope", "-w", str(tmp_path / "work")], site, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    assert "the installed package soxr fails to import (OSError: Could not load this library" in errors[0]
    assert "pip install --force-reinstall soxr" in errors[0]
    assert "requirements/lock.txt" in errors[0]
    assert not list((tmp_path / "out" / "logs").rglob("crash-*"))  # not a bidsenc bug: no crash file
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("exc", [ValueError("not an import"), KeyError("x")])
def test_other_errors_are_not_blamed_on_a_package(exc):
    from bidsenc.errors import broken_package

    try:
        raise exc
    except Exception as err:
        assert broken_package(err) is None
