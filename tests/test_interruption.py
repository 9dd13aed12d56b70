"""Runs killed (SIGKILL) during feature extraction, fitting and the output swap, then rerun.

A killed run must never lose the previous complete outputs, and the rerun must leave no
stale folder and the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bidsenc.derivatives.participant import MARKER_SUFFIX

# Run bidsenc with one function replaced by one that kills the process at its n-th call.
_KILLER = """
import importlib, os, signal, sys
owner = importlib.import_module("{module}")
*path, name = "{attr}".split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = [0]
def killer(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, killer)
from bidsenc.cli.run import main
sys.exit(main(sys.argv[1:]))
"""

# Kill between the swap's renames: after the old folder was moved aside, before the new one moves in.
_SWAP_KILLER = """
import os, signal, sys
import bidsenc.derivatives.participant as target
calls = [0]
class _Os:
    def __getattr__(self, name):
        return getattr(os, name)
    def rename(self, src, dst):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.rename(src, dst)
target.os = _Os()
from bidsenc.cli.run import main
sys.exit(main(sys.argv[1:]))
"""

KILL_POINTS = {
    "extraction": _KILLER.format(module="bidsenc.features.cache", attr="FeatureStore._write", nth=1),
    "fitting": _KILLER.format(module="bidsenc.fit", attr="evaluate_layer", nth=2),
    "swap": _SWAP_KILLER,
}


def _args(ds: Path, out: Path, work: Path) -> list[str]:
    return [str(ds), str(out), "participant", "--participant-label", "01", "-w", str(work),
            "--feature", "lowlevel:word_rate", "lowlevel:envelope", "--null-draws", "0",
            "--data-scaling-seeds", "0", "--n-permutations", "20", "--skip-bids-validation", "--no-reports"]


def _run(script: str | None, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "bidsenc", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file of the participant's folder, by relative path."""
    sub = out / "sub-01"
    return {str(p.relative_to(sub)): p.read_bytes() for p in sorted(sub.rglob("*")) if p.is_file()}


def _hidden(out: Path) -> list[str]:
    return [p.name for p in (out / "sub-01").rglob(".func*")]


@pytest.fixture(scope="module")
def baseline(demo, tmp_path_factory):
    """One uninterrupted run: the bytes every rerun must reproduce."""
    root = tmp_path_factory.mktemp("baseline")
    ds = demo[0] / "ds"
    proc = _run(None, _args(ds, root / "out", root / "work"))
    assert proc.returncode == 0, proc.stderr
    return ds, _outputs(root / "out")


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_reruns_to_the_uninterrupted_outputs(baseline, tmp_path, point):
    ds, expected = baseline
    out, work = tmp_path / "out", tmp_path / "work"
    if point == "swap":  # a rerun over complete outputs (--force), killed in the middle of replacing them
        assert _run(None, _args(ds, out, work)).returncode == 0
    killed = _run(KILL_POINTS[point], _args(ds, out, work) + (["--force"] if point == "swap" else []))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "swap":
        # the previous outputs are not lost: moved aside whole, next to the complete new folder
        kept = [p for p in (out / "sub-01").rglob(f".func.*/*{MARKER_SUFFIX}")]
        assert len(kept) == 2, _hidden(out)
    else:
        assert not list(out.rglob(f"*{MARKER_SUFFIX}"))  # nothing that looks complete
    rerun = _run(None, _args(ds, out, work))
    assert rerun.returncode == 0, rerun.stderr
    assert _hidden(out) == []  # no stale staging, build, new or old folders
    got = _outputs(out)
    assert got.keys() == expected.keys()
    different = [name for name in got if got[name] != expected[name]]
    assert different == []


def test_stale_staging_folders_are_cleaned(baseline, tmp_path):
    ds, expected = baseline
    out, work = tmp_path / "out", tmp_path / "work"
    assert _run(None, _args(ds, out, work)).returncode == 0
    func = next((out / "sub-01").rglob("func"))
    for stale in (".func.tmp-99999", ".func.build-99998", ".func.new-99997"):
        (func.parent / stale).mkdir()
        (func.parent / stale / "junk.txt").write_text("left by a killed job")
    assert _run(None, _args(ds, out, work)).returncode == 0
    assert _hidden(out) == []
    assert _outputs(out) == expected


def test_complete_participants_are_skipped_unless_settings_change_or_force(baseline, tmp_path):
    """A resubmitted job does only what is left: complete outputs of the same settings are kept as they are."""
    ds, expected = baseline
    out, work = tmp_path / "out", tmp_path / "work"
    assert _run(None, _args(ds, out, work)).returncode == 0
    marker = next(out.rglob(f"*{MARKER_SUFFIX}"))
    written = marker.stat().st_mtime_ns
    again = _run(None, _args(ds, out, work))
    assert again.returncode == 0 and "sub-01: outputs complete in" in again.stderr and "skipped" in again.stderr
    assert marker.stat().st_mtime_ns == written and _outputs(out) == expected
    # the same job with a setting that changes the results, or with --force, computes it again
    changed = _run(None, _args(ds, out, work)[:-1] + ["--n-permutations", "30", "--no-reports"])
    assert changed.returncode == 0 and "outputs complete" not in changed.stderr
    assert next(out.rglob(f"*{MARKER_SUFFIX}")).stat().st_mtime_ns != written
    written = next(out.rglob(f"*{MARKER_SUFFIX}")).stat().st_mtime_ns
    forced = _run(None, _args(ds, out, work) + ["--n-permutations", "30", "--force"])
    assert forced.returncode == 0 and "outputs complete" not in forced.stderr
    assert next(out.rglob(f"*{MARKER_SUFFIX}")).stat().st_mtime_ns != written
    # outputs of a missing file are not complete
    next(f for f in (out / "sub-01").rglob("*_statmap.nii.gz")).unlink()
    assert "outputs complete" not in _run(None, _args(ds, out, work) + ["--n-permutations", "30"]).stderr


def test_a_participant_is_computed_again_when_its_input_files_change(baseline, tmp_path):
    """Same settings, new data (a BOLD file rewritten by another fMRIPrep run): not skipped as complete."""
    ds, out, work = tmp_path / "ds", tmp_path / "out", tmp_path / "work"
    shutil.copytree(baseline[0], ds)
    assert _run(None, _args(ds, out, work)).returncode == 0
    assert "sub-01: outputs complete in" in _run(None, _args(ds, out, work)).stderr
    bold = next((ds / "sub-01").rglob("*_bold.nii.gz"))
    os.utime(bold, ns=(bold.stat().st_atime_ns, bold.stat().st_mtime_ns + 10**9))
    again = _run(None, _args(ds, out, work))
    assert again.returncode == 0 and "outputs complete" not in again.stderr
    assert "sub-01: its input files changed since its outputs were written: computed again" in again.stderr
    assert "sub-01: outputs complete in" in _run(None, _args(ds, out, work)).stderr  # and kept from then on


def test_two_writers_of_one_participant_take_turns(tmp_path):
    """The swap is exclusive: two jobs writing the same participant at once never mix or crash."""
    from concurrent.futures import ThreadPoolExecutor

    from bidsenc.derivatives import participant as p

    final = tmp_path / "sub-01" / "func"
    final.parent.mkdir(parents=True)

    def write(tag: str) -> None:
        staging = final.parent / f".func.tmp-{tag}"
        staging.mkdir()
        for k in range(30):
            (staging / f"sub-01_desc-x_{k:02d}.txt").write_text(tag)
        (staging / f"sub-01{MARKER_SUFFIX}").write_text(tag)
        with p._exclusive(final.parent / p.LOCK_NAME):
            p._swap_in(staging, final, "sub-01")
        shutil.rmtree(staging, ignore_errors=True)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, [f"w{i}" for i in range(12)]))
    contents = {f.read_text() for f in final.iterdir()}
    assert len(contents) == 1  # every file from the same writer: no mixture
    assert len(list(final.iterdir())) == 31
    assert not [x for x in final.parent.iterdir() if x.name.startswith(".func.")]


def test_other_analyses_in_the_folder_survive_a_swap(tmp_path):
    from bidsenc.derivatives import participant as p

    final = tmp_path / "sub-01" / "func"
    final.mkdir(parents=True)
    (final / "sub-01_task-a_desc-x_statmap.json").write_text("a")  # another analysis's file
    (final / "sub-01_task-b_desc-x_statmap.json").write_text("old b")
    staging = tmp_path / "sub-01" / ".func.tmp-1"
    staging.mkdir()
    (staging / "sub-01_task-b_desc-x_statmap.json").write_text("new b")
    p._swap_in(staging, final, "sub-01_task-b")
    assert (final / "sub-01_task-a_desc-x_statmap.json").read_text() == "a"
    assert (final / "sub-01_task-b_desc-x_statmap.json").read_text() == "new b"
    assert os.stat(final / "sub-01_task-a_desc-x_statmap.json").st_nlink == 1  # the old folder is gone


def test_a_reader_never_sees_files_of_two_writes(tmp_path, monkeypatch):
    """The group level reads a participant under a shared lock: never half of one write and half of another."""
    import threading

    from bidsenc.derivatives import participant as p

    final = tmp_path / "sub-01" / "func"
    final.parent.mkdir(parents=True)
    stop = threading.Event()

    def write(n: int) -> None:
        i = 0
        while i < n or (n == 0 and not stop.is_set()):
            i += 1
            staging = final.parent / f".func.tmp-{i}"
            staging.mkdir()
            for k in range(30):
                (staging / f"sub-01_desc-x_{k:02d}.txt").write_text(str(i))
            with p._exclusive(final.parent / p.LOCK_NAME):
                p._swap_in(staging, final, "sub-01")
            shutil.rmtree(staging, ignore_errors=True)

    write(1)
    writer = threading.Thread(target=write, args=(0,))  # until the reader is done
    writer.start()
    seen = []
    for _ in range(300):
        with p._shared([final.parent / p.LOCK_NAME]):
            seen.append({f.read_text() for f in final.iterdir()})
    stop.set()
    writer.join()
    assert all(len(tags) == 1 for tags in seen) and len(set().union(*seen)) > 3  # many writes seen, none mixed
    # and read_participant takes that lock, on the participant's folder and each session's
    taken = []
    real = p._shared
    monkeypatch.setattr(p, "_shared", lambda paths: taken.append(paths) or real(paths))
    (tmp_path / "sub-01" / "ses-2").mkdir()
    (tmp_path / "sub-01" / "ses-2" / p.LOCK_NAME).write_text("")
    with pytest.raises(p.PartialOutputError):
        p.read_participant(tmp_path, "01")
    assert taken == [[final.parent / p.LOCK_NAME, tmp_path / "sub-01" / "ses-2" / p.LOCK_NAME]]
