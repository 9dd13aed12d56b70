"""``bidsenc-slurm`` against a real one-node SLURM cluster started here (root only).

The cluster (munged, slurmctld, slurmd from Debian's slurm packages) lives in a temporary
folder with its own munge socket and ports, so it touches no system configuration; without
the daemons or root the tests skip and say why. One cluster and one demo dataset serve every
test, in file order: the scripts of --dry-run are accepted by ``sbatch --test-only``; a first
submission fails one participant (a BOLD cut to half its volumes) and its maps of the other
equal a serial run's; a second has one job cancelled while it waits to write its outputs (the
test holds a reader's lock); a third completes it, skipping the complete participant. The
commands --dry-run prints are run as a user would paste them, with a features job that fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(900)

_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "scontrol")
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
          "DEADLINE"}
BIN = Path(sys.executable).parent


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path) -> str:
    """A minimal one-node configuration: the node as ``slurmd -C`` sees it, no cgroups, no accounting."""
    node = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    node = node.splitlines()[0]  # NodeName=... CPUs=... RealMemory=... (the next line is the uptime)
    name = re.search(r"NodeName=(\S+)", node).group(1)
    return f"""\
ClusterName=bidsenctest
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MessageTimeout=5
SlurmdTimeout=30
SchedulerTimeSlice=5
InactiveLimit=0
KillWait=15
MinJobAge=600
{node} State=UNKNOWN
PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM cluster of our own; ``SLURM_CONF`` points the client commands at it."""
    missing = [n for n in (*_DAEMONS, *_CLIENTS) if _which(n) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found; on Debian: apt-get install "
                    "slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root (slurmd runs jobs as their users)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [_which("munged"), "--foreground", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
             f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _until(lambda: (root / "munge.socket").exists(), 10, "munged did not start", root / "munged.log")
        # -i: ignore (absent) saved state; the daemons log to their files
        procs.append(subprocess.Popen([_which("slurmctld"), "-D", "-i"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([_which("slurmd"), "-D"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _until(lambda: "idle" in _run(["sinfo", "-h", "-o", "%t"], check=False).stdout, 60,
               "the SLURM node did not become idle", root / "slurmctld.log")
        yield root
    finally:
        _run(["scancel", "--user", "root"], check=False)
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _until(condition, timeout: float, message: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{message} within {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def _run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo dataset and its tiny models; two participants are enough."""
    from bidsenc.synth import make_demo

    root = tmp_path_factory.mktemp("slurm-demo")
    make_demo(root, with_models=True, layout="raw")
    labels = json.loads((root / "truth.json").read_text())["participants"][:2]
    # the demo's settings with two of its language models (no Whisper): minutes less per run
    import tomllib

    import tomli_w

    settings = tomllib.loads((root / "bidsenc.toml").read_text())
    lms = [f for f in settings.get("features", []) if f.get("kind") == "lm"][:2]
    if len(lms) == 2:
        settings["features"] = lms
    (root / "slurm.toml").write_text(tomli_w.dumps(settings))
    return root, labels


def _options(root: Path, labels: list[str]) -> list[str]:
    """The bidsenc options of every run here; no misaligned-stimulus null or data-scaling refits."""
    return ["--participant-label", *labels, "--config-file", "slurm.toml", "--skip-bids-validation",
            "--null-draws", "0", "--data-scaling-seeds", "0"]


def _submit(root: Path, out: str, options: list[str], *extra: str) -> dict[str, str]:
    """Submit with bidsenc-slurm; return the job ids of its last line."""
    proc = _run([BIN / "bidsenc-slurm", str(root / "ds"), out, *options, *extra], cwd=root)
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"features=\d+ participants=\d+ group=\d+", last), proc.stdout
    return dict(item.split("=") for item in last.split())


def _states(job: str) -> dict[str, tuple[str, str]]:
    """{task: (state, reason)} of a job, or of each task of an array job, from scontrol (no accounting here)."""
    text = _run(["scontrol", "-o", "show", "job", job]).stdout
    states = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        states[fields.get("ArrayTaskId") or fields["JobId"]] = (fields["JobState"], fields.get("Reason", ""))
    return states


def _wait(jobs: dict[str, str], out: Path, timeout: float = 600) -> dict[str, dict[str, str]]:
    """Wait until every job ended (or can never start); return their states."""
    def ended():
        states = [s for job in jobs.values() for s in _states(job).values()]
        return all(state in _ENDED or "DependencyNeverSatisfied" in reason for state, reason in states)

    _until(ended, timeout, f"SLURM jobs {jobs} did not end:\n{_logs(out)}")
    return {name: {task: s for task, (s, _) in _states(job).items()} for name, job in jobs.items()}


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((out / "logs" / "slurm").glob("*.log")))


def _task_logs(out: Path, array: str) -> dict[str, str]:
    """{participant label: its array task's log} of one participant array job."""
    logs = {}
    for path in (out / "logs" / "slurm").glob(f"participant-{array}_*.log"):
        text = path.read_text()
        found = re.search(r"participant sub-(\S+) \(array task", text)
        logs[found.group(1) if found else path.name] = text
    return logs


def _bold_files(ds: Path, label: str) -> list[Path]:
    return sorted(p for p in ds.rglob(f"sub-{label}_*_bold.nii*") if p.is_file())


def _halve(path: Path) -> None:
    """Keep the first half of a BOLD run's volumes: a scan cut short, a valid file."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    half = nib.Nifti1Image(data[..., : data.shape[-1] // 2], img.affine, img.header)
    nib.save(half, path.with_name("half-" + path.name))
    os.replace(path.with_name("half-" + path.name), path)


def _maps(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    maps = {}
    for path in sorted(folder.rglob("*_statmap.nii.gz")) + sorted(folder.rglob("*.func.gii")):
        img = nib.load(path)
        data = (np.concatenate([d.data.ravel() for d in img.darrays]) if path.name.endswith(".gii")
                else np.asanyarray(img.dataobj))
        maps[str(path.relative_to(folder))] = data
    return maps


def test_usage_errors_fail_before_submitting(demo, tmp_path):
    root, labels = demo
    ds = str(root / "ds")
    typo = _run([BIN / "bidsenc-slurm", ds, str(tmp_path / "out"), "--participant-lable", "01"], check=False)
    assert typo.returncode == 64 and "unrecognized arguments: --participant-lable" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1, typo.stderr
    # no SLURM on PATH: one line, exit 69 (--dry-run needs none)
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = _run([BIN / "bidsenc-slurm", ds, str(tmp_path / "out"), *_options(root, labels)], check=False, env=env,
                cwd=root)
    assert proc.returncode == 69 and "sbatch not found" in proc.stderr, proc.stderr


def test_abbreviated_options_are_written_in_full(demo, tmp_path):
    """bidsenc takes --participant-lab for --participant-label; each array task must still drop it."""
    root, labels = demo
    out = tmp_path / "out"
    options = [o.replace("--participant-label", "--participant-lab") for o in _options(root, labels)]
    _run([BIN / "bidsenc-slurm", str(root / "ds"), str(out), *options, "--dry-run"], cwd=root)
    task = (out / "logs" / "slurm" / "participants.sbatch").read_text().splitlines()[-1]
    assert task.count("--participant-label") == 1 and "--participant-lab " not in task
    assert "--participant-label \"$label\" --config-file slurm.toml" in task
    abbreviated = _run([BIN / "bidsenc-slurm", str(root / "ds"), str(out), *options, "--features-o", "--dry-run"],
                       check=False, cwd=root)
    assert abbreviated.returncode == 64 and "runs the features job itself" in abbreviated.stderr


def test_dry_run_scripts_are_accepted(cluster, demo):
    root, labels = demo
    out = root / "out dry 100%"  # a space and a '%' in #SBATCH --output
    options = _options(root, labels)
    proc = _run([BIN / "bidsenc-slurm", str(root / "ds"), str(out), *options, "--dry-run", "--throttle", "1",
                 "--sbatch-option", "time=30:00", "--features-sbatch-option=--gres=gpu:1"], cwd=root)
    folder = out / "logs" / "slurm"
    assert str(folder) in proc.stdout
    scripts = {name: (folder / f"{name}.sbatch").read_text() for name in ("features", "participants", "group")}
    assert (folder / "participants.txt").read_text().split() == labels
    assert all("#SBATCH --time=30:00" in s and "set -euo pipefail" in s for s in scripts.values())
    assert "--gres=gpu:1" in scripts["features"] and "gres" not in scripts["participants"] + scripts["group"]
    assert f"#SBATCH --array=1-{len(labels)}%1" in scripts["participants"]
    assert "--features-only" in scripts["features"] and " group " in scripts["group"]
    assert not _run(["squeue", "-h"]).stdout.strip()  # nothing submitted
    # this node has no GPU: the scripts without --gres, as the cluster would run them
    _run([BIN / "bidsenc-slurm", str(root / "ds"), str(out), *options, "--dry-run"], cwd=root)
    for name in ("features", "participants", "group"):
        check = _run(["sbatch", "--test-only", str(folder / f"{name}.sbatch")], cwd=root)
        assert "to start at" in check.stderr, check.stderr


def test_printed_commands_submit_and_a_failed_features_job_cancels_the_array(cluster, demo):
    """The commands --dry-run prints, run as a user would paste them, with a features job that fails."""
    root, labels = demo
    out = root / "out dry 100%"
    proc = _run([BIN / "bidsenc-slurm", str(root / "ds"), str(out), *_options(root, labels), "--dry-run"], cwd=root)
    folder = out / "logs" / "slurm"
    features = folder / "features.sbatch"
    features.write_text(re.sub(r"(?m)^exec .*$", "echo features failed; exit 3", features.read_text()))
    submitted = _run(["bash", "-c", proc.stdout.split("submit them with: ", 1)[1]], cwd=root)
    last = submitted.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"features=\d+ participants=\d+ group=\d+", last), submitted.stdout
    jobs = dict(item.split("=") for item in last.split())
    states = _wait(jobs, out, timeout=180)
    assert states["features"] == {jobs["features"]: "FAILED"}, _logs(out)
    assert set(states["participants"].values()) == {"CANCELLED"}, states  # not left pending for ever
    assert not _task_logs(out, jobs["participants"])  # no participant ran
    # the group ran after the cancelled array and says there was nothing to summarise
    assert states["group"] == {jobs["group"]: "FAILED"}, _logs(out)
    assert "no complete participant outputs" in (folder / f"group-{jobs['group']}.log").read_text()
    assert (folder / f"features-{jobs['features']}.log").read_text().strip() == "features failed"


@pytest.fixture(scope="module")
def first_submission(cluster, demo):
    """The demo through bidsenc-slurm with one participant's BOLD runs cut to half their volumes,
    and a serial run of the same command; the BOLD files are restored afterwards."""
    root, labels = demo
    bad = labels[1]
    ds = root / "ds"
    originals = root / "bold-originals"
    originals.mkdir()
    bold = _bold_files(ds, bad)
    assert bold, f"no NIfTI BOLD of sub-{bad} in {ds}"
    for path in bold:
        shutil.copy2(path, originals / path.name)
        _halve(path)
    out = root / "out-slurm"
    jobs = _submit(root, str(out), _options(root, labels), "--sbatch-option", "time=30:00")
    states = _wait(jobs, out)
    serial = _run([BIN / "bidsenc", str(ds), str(root / "out-serial"), "participant", *_options(root, labels)],
                  check=False, cwd=root)
    for path in bold:
        shutil.copy2(originals / path.name, path)
    return jobs, states, out, serial


def test_maps_equal_a_serial_run(demo, first_submission):
    root, (good, bad) = demo
    jobs, states, out, serial = first_submission
    assert states["features"] == {jobs["features"]: "COMPLETED"}, _logs(out)
    assert serial.returncode == 0, serial.stderr[-3000:]
    ours, theirs = _maps(out / f"sub-{good}"), _maps(root / "out-serial" / f"sub-{good}")
    assert len(ours) >= 2 and ours.keys() == theirs.keys()
    for name, data in ours.items():
        np.testing.assert_array_equal(data, theirs[name], err_msg=name)
    for folder in (out, root / "out-serial"):
        assert not _maps(folder / f"sub-{bad}")


def test_failed_participant_fails_its_task_and_the_group_names_it(demo, first_submission):
    _, (good, bad) = demo
    jobs, states, out, _ = first_submission
    logs = _task_logs(out, jobs["participants"])
    assert sorted(states["participants"].values()) == ["COMPLETED", "FAILED"], _logs(out)
    assert set(logs) == {good, bad}
    assert f"sub-{bad}" in logs[bad] and "error" in logs[bad].lower()
    assert states["group"] == {jobs["group"]: "COMPLETED"}, _logs(out)
    report = (out / "group.html").read_text()
    assert f"sub-{bad}" in report, "the group report does not name the failed participant"


def test_cancelled_job_is_completed_by_a_resubmission(cluster, demo, first_submission):
    root, (good, bad) = demo
    out = first_submission[2]
    options = _options(root, [good, bad])
    jobs = _submit(root, str(out), options)
    array = jobs["participants"]
    task_of = {label: str(i) for i, label in enumerate([good, bad], start=1)}

    def running():
        state = _states(array).get(task_of[bad], ("PENDING", ""))[0]  # a pending array is one line
        assert state in ("PENDING", "RUNNING"), f"sub-{bad} ended before it could be cancelled: {state}\n{_logs(out)}"
        return state == "RUNNING"

    # The test holds a reader's shared lock on the participant's folder, as a group job reading it
    # would: the job fits, then waits for the lock to write, and is cancelled there, right before
    # its outputs would appear, however fast the fit is on this machine.
    folder = out / f"sub-{bad}"
    folder.mkdir(exist_ok=True)
    with open(folder / ".bidsenc.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        _until(running, 300, f"sub-{bad}'s job did not start:\n{_logs(out)}")
        _until(lambda: "encoding models fitted" in _task_logs(out, array).get(bad, ""), 300,
               f"sub-{bad}'s job did not fit its models:\n{_logs(out)}")
        time.sleep(2)  # into the wait for the lock
        assert _states(array)[task_of[bad]][0] == "RUNNING", _logs(out)
        _run(["scancel", f"{array}_{task_of[bad]}"])
        _until(lambda: _states(array).get(task_of[bad], ("",))[0] in _ENDED, 120,
               f"sub-{bad}'s job did not end when cancelled:\n{_logs(out)}")
    states = _wait(jobs, out)
    assert states["participants"][task_of[bad]] == "CANCELLED", _logs(out)
    assert states["participants"][task_of[good]] == "COMPLETED", _logs(out)
    logs = _task_logs(out, array)
    assert re.search(rf"sub-{good}: outputs complete.*skipped", logs[good]), logs[good]
    # nothing half-written: no maps, no staged folder, of the cancelled participant
    assert not _maps(out / f"sub-{bad}")
    assert not [p for p in out.rglob(".*") if re.match(r"\.\w+\.(tmp|build|new)-", p.name)]
    status = json.loads((out / "logs" / f"status-sub-{bad}.json").read_text())
    assert "interrupted" in (status["error"] or ""), status

    jobs = _submit(root, str(out), options)
    states = _wait(jobs, out)
    assert all(s == "COMPLETED" for job in states.values() for s in job.values()), _logs(out)
    logs = _task_logs(out, jobs["participants"])
    assert re.search(rf"sub-{good}: outputs complete.*skipped", logs[good]), logs[good]
    assert not re.search(r"outputs complete.*skipped", logs[bad]), logs[bad]
    assert len(_maps(out / f"sub-{bad}")) == len(_maps(out / f"sub-{good}"))
