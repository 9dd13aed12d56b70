"""A corpus of malformed datasets and argument sets: every one fails cleanly.

Each case copies the demo dataset (hard links: a file a case breaks is replaced, never
written through), breaks one thing, and runs the real command line in-process on
participant 01 with a cheap feature space. Every case must give the documented exit code,
one error line naming the file or setting (with what to do), no traceback, leave the input
tree byte-identical, and leave no output that looks complete (no participant marker).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsenc.cli.run import main
from bidsenc.derivatives.participant import MARKER_SUFFIX

FUNC1 = Path("sub-01/ses-1/func")
FUNC2 = Path("sub-01/ses-2/func")
GLACIER = FUNC1 / "sub-01_ses-1_task-glacier_bold.nii.gz"
GLACIER_EVENTS = FUNC1 / "sub-01_ses-1_task-glacier_events.tsv"


@dataclass
class Case:
    name: str
    code: int
    fragment: str
    mutate: Callable  # (ds, tmp, monkeypatch) -> extra command-line arguments


CASES: list[Case] = []


def case(name: str, code: int, fragment: str):
    def register(mutate):
        CASES.append(Case(name, code, fragment, mutate))
        return mutate
    return register


# ----------------------------------------------------------------------------- helpers


def _replace(path: Path, data: bytes | str) -> None:
    """New content in a new file (the copy's files are hard links to the shared demo)."""
    path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _events(ds: Path, rel: Path, text: str) -> None:
    _replace(ds / rel, text)


def _bold(ds: Path, rel: Path, data: np.ndarray, tr: float = 2.0) -> None:
    img = nib.load(ds / rel)
    new = nib.Nifti1Image(data.astype(np.float32), img.affine)
    new.header.set_zooms(img.header.get_zooms()[:3] + ((tr,) if data.ndim == 4 else ()))
    (ds / rel).unlink()
    nib.save(new, ds / rel)


def _bold_data(ds: Path, rel: Path) -> np.ndarray:
    return np.asarray(nib.load(ds / rel).dataobj, dtype=np.float32)


def _sidecar(ds: Path, task: str, **changes) -> None:
    path = ds / f"task-{task}_bold.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    _replace(path, json.dumps(meta))


def _config(tmp: Path, text: str) -> list[str]:
    (tmp / "config.toml").write_text(text)
    return ["--config-file", str(tmp / "config.toml")]


def _digest(root: Path) -> str:
    """Names, link targets and contents of everything under ``root``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- settings (64)


@case("config-int-as-string", 64, "[models] n_permutations = 'many'")
def _(ds, tmp, mp):
    return _config(tmp, '[models]\nn_permutations = "many"\n')


@case("config-bool-as-string", 64, "[outputs] reports = 'false'")
def _(ds, tmp, mp):
    return _config(tmp, '[outputs]\nreports = "false"\n')


@case("config-float-as-string", 64, "[outputs] ceiling_threshold = 'high'")
def _(ds, tmp, mp):
    return _config(tmp, '[outputs]\nceiling_threshold = "high"\n')


@case("config-features-table", 64, "[[features]]")
def _(ds, tmp, mp):
    return _config(tmp, '[features]\nkind = "lm"\nmodel = "facebook/opt-125m"\n')


@case("config-unknown-key", 64, "unknown [models] setting(s): alpha")
def _(ds, tmp, mp):
    return _config(tmp, "[models]\nalpha = 3\n")


@case("config-fdr-out-of-range", 64, "fdr_q must lie strictly between 0 and 1")
def _(ds, tmp, mp):
    return _config(tmp, "[models]\nfdr_q = 5\n")


@case("config-not-toml", 64, "is not valid TOML")
def _(ds, tmp, mp):
    return _config(tmp, "[models\nn_folds = 3\n")


@case("permutations-zero", 64, "n_permutations must be a positive whole number")
def _(ds, tmp, mp):
    return ["--n-permutations", "0"]


@case("permutations-negative", 64, "n_permutations must be a positive whole number")
def _(ds, tmp, mp):
    return ["--n-permutations", "-5"]


@case("mem-zero", 64, "--mem")
def _(ds, tmp, mp):
    return ["--mem", "0"]


@case("mem-too-small", 64, "--mem 1e-06 GB is too small")
def _(ds, tmp, mp):
    return ["--mem", "1KB"]


@case("ceiling-threshold-negative", 64, "ceiling_threshold must lie between 0 and 1")
def _(ds, tmp, mp):
    return ["--ceiling-threshold", "-3"]


@case("feature-kind-unknown", 64, "KIND:MODEL")
def _(ds, tmp, mp):
    return ["--feature", "vision:resnet"]


@case("bootstrap-chunks-zero", 64, "bootstrap_chunks must be a positive integer")
def _(ds, tmp, mp):
    return ["--preset", "reference", "--bootstrap-chunks", "0"]


@case("output-is-input", 64, "same folder as bids_dir")
def _(ds, tmp, mp):
    return ["--output-dir-is-input"]


@case("work-inside-dataset", 64, "inside bids_dir")
def _(ds, tmp, mp):
    return ["-w", str(ds / "work")]


@case("mask-missing", 64, "--mask")
def _(ds, tmp, mp):
    return ["--mask", str(tmp / "no-mask.nii.gz")]


@case("filter-file-bad-json", 64, "not valid JSON")
def _(ds, tmp, mp):
    (tmp / "filters.json").write_text("{bold: }")
    return ["--bids-filter-file", str(tmp / "filters.json")]


# ----------------------------------------------------------------------------- selection (18) and structure


@case("participant-unknown", 18, "participant(s) 99 not found")
def _(ds, tmp, mp):
    return ["--participant-label", "99"]


@case("task-unknown", 18, "no BOLD run of sub-01 matches")
def _(ds, tmp, mp):
    return ["--task", "nosuchstory"]


@case("dataset-empty", 66, "holds no sub-* folder")
def _(ds, tmp, mp):
    for sub in ds.glob("sub-*"):
        shutil.rmtree(sub)
    return ["--participant-label"]  # all participants


@case("no-events-anywhere", 66, "no story")
def _(ds, tmp, mp):
    for events in ds.rglob("*_events.tsv"):
        events.unlink()
    return []


# ----------------------------------------------------------------------------- events and stimuli


@case("events-header-only", 65, "has a header but no rows")
def _(ds, tmp, mp):
    _events(ds, GLACIER_EVENTS, "onset\tduration\ttrial_type\tstim_file\n")


@case("events-onset-not-numbers", 65, "the onset column must hold numbers")
def _(ds, tmp, mp):
    _events(ds, GLACIER_EVENTS, "onset\tduration\ttrial_type\tstim_file\nten\t120\tstory\tglacier_audio.wav\n")


@case("events-no-duration", 65, "lacks the required column(s) duration")
def _(ds, tmp, mp):
    _events(ds, GLACIER_EVENTS, "onset\ttrial_type\tstim_file\n10\tstory\tglacier_audio.wav\n")


@case("stim-file-missing", 66, "nosuch_audio.wav")
def _(ds, tmp, mp):
    _events(ds, GLACIER_EVENTS, "onset\tduration\ttrial_type\tstim_file\n10\t120\tstory\tnosuch_audio.wav\n")
    return ["--feature", "lowlevel:envelope"]


@case("stim-file-dotdot", 65, "leads outside the stimuli folder")
def _(ds, tmp, mp):
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copy(ds / "stimuli" / "glacier_audio.wav", outside / "x.wav")
    _events(ds, GLACIER_EVENTS, "onset\tduration\ttrial_type\tstim_file\n10\t120\tstory\t"
            "gentle/../../../outside/x.wav\n")


@case("stim-file-absolute", 65, "leads outside the stimuli folder")
def _(ds, tmp, mp):
    _events(ds, GLACIER_EVENTS, "onset\tduration\ttrial_type\tstim_file\n10\t120\tstory\t/etc/passwd\n")


@case("stim-audio-garbage", 65, "glacier_audio.wav")
def _(ds, tmp, mp):
    _replace(ds / "stimuli" / "glacier_audio.wav", b"RIFF\x00\x00garbage" * 10)
    return ["--feature", "lowlevel:envelope"]


@case("textgrid-truncated", 65, "glacier_audio.TextGrid")
def _(ds, tmp, mp):
    text = (ds / "stimuli" / "glacier_audio.TextGrid").read_text()
    _replace(ds / "stimuli" / "glacier_audio.TextGrid", text[: len(text) // 2])


@case("textgrid-phones-only", 65, "holds phones only")
def _(ds, tmp, mp):
    path = ds / "stimuli" / "glacier_audio.TextGrid"
    text = path.read_text()
    second = text.index("item [2]:")
    _replace(path, text[:second].replace("size = 2", "size = 1"))


@case("gentle-all-unaligned", 65, "align.csv")
def _(ds, tmp, mp):
    path = ds / "stimuli" / "gentle" / "orchard" / "align.csv"
    rows = [line.split(",")[:2] for line in path.read_text().splitlines()]
    _replace(path, "".join(f"{a},{b},,\n" for a, b in rows))


@case("word-table-no-times", 65, "canyon_audio.tsv")
def _(ds, tmp, mp):
    _replace(ds / "stimuli" / "canyon_audio.tsv", "word\tstart\tend\nof\tsoon\tlater\n")


# ----------------------------------------------------------------------------- BOLD


@case("bold-truncated", 65, "truncated or corrupt")
def _(ds, tmp, mp):
    data = (ds / GLACIER).read_bytes()
    _replace(ds / GLACIER, data[: len(data) // 2])


@case("bold-not-gzip", 65, GLACIER.name)
def _(ds, tmp, mp):
    _replace(ds / GLACIER, b"this is not an image")


@case("bold-3d", 65, "expected a 4D BOLD series")
def _(ds, tmp, mp):
    _bold(ds, GLACIER, _bold_data(ds, GLACIER)[..., 0])


@case("bold-too-short", 65, "cannot hold the story")
def _(ds, tmp, mp):
    _bold(ds, GLACIER, _bold_data(ds, GLACIER)[..., :20])


@case("bold-all-zero", 65, "sub-01_ses-1_task-glacier")
def _(ds, tmp, mp):
    for bold in ds.glob("sub-01/*/func/*_bold.nii.gz"):
        _bold(ds, bold.relative_to(ds), np.zeros_like(_bold_data(ds, bold.relative_to(ds)))
              if "glacier" in bold.name else _bold_data(ds, bold.relative_to(ds)))
    return ["--task", "glacier"]


@case("bold-all-nan", 65, "hold no usable signal")
def _(ds, tmp, mp):
    _bold(ds, GLACIER, np.full_like(_bold_data(ds, GLACIER), np.nan))
    return ["--task", "glacier", "festival"]


@case("tr-missing", 65, "no valid RepetitionTime")
def _(ds, tmp, mp):
    _sidecar(ds, "glacier", RepetitionTime=None)


@case("tr-zero", 65, "no valid RepetitionTime")
def _(ds, tmp, mp):
    _sidecar(ds, "glacier", RepetitionTime=0)


@case("sidecar-malformed-json", 65, "task-glacier_bold.json: not valid JSON")
def _(ds, tmp, mp):
    _replace(ds / "task-glacier_bold.json", '{"RepetitionTime": 2.0,')


@case("mask-other-grid", 65, "is not on the voxel grid")
def _(ds, tmp, mp):
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)), tmp / "mask.nii.gz")
    return ["--mask", str(tmp / "mask.nii.gz")]


@case("mask-empty", 65, "selects no voxel")
def _(ds, tmp, mp):
    img = nib.load(ds / GLACIER)
    nib.save(nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine), tmp / "mask.nii.gz")
    return ["--mask", str(tmp / "mask.nii.gz")]


@case("bids-database-stale", 66, "the index is stale")
def _(ds, tmp, mp):
    from bidsenc.bids.discover import open_dataset
    from bidsenc.cli.run import configure

    args = ["--bids-database-dir", str(tmp / "bids-db")]
    open_dataset(configure([str(ds), str(tmp / "first-out"), "participant", *args]))  # index, then change
    (ds / GLACIER).unlink()
    return args


# ----------------------------------------------------------------------------- models


@case("model-path-missing", 66, "model folder")
def _(ds, tmp, mp):
    return ["--feature", f"lm:{tmp}/models/no-such-model"]


@case("model-not-offline", 66, "is not available offline")
def _(ds, tmp, mp):
    mp.setenv("HF_HOME", str(tmp / "hf"))
    return ["--feature", "lm:someone/not-a-cached-model"]


@case("model-is-a-file", 64, "a model is a folder")
def _(ds, tmp, mp):
    (tmp / "model.bin").write_bytes(b"0" * 10)
    return ["--feature", f"lm:{tmp}/model.bin"]


# ----------------------------------------------------------------------------- outputs, cache, work


@case("output-under-a-file", 73, "cannot create")
def _(ds, tmp, mp):
    (tmp / "afile").write_text("x")
    return ["--output-under", str(tmp / "afile" / "out")]


@case("work-dir-is-a-file", 73, "cannot create")
def _(ds, tmp, mp):
    (tmp / "work-file").write_text("x")
    return ["-w", str(tmp / "work-file")]


@case("feature-cache-is-a-file", 73, "is a file, not a folder")
def _(ds, tmp, mp):
    (tmp / "cache-file").write_text("x")
    return ["--feature-cache", str(tmp / "cache-file")]


@case("participant-folder-is-a-file", 73, "out/sub-01 is a file, not a folder")
def _(ds, tmp, mp):
    (tmp / "out").mkdir()
    (tmp / "out" / "sub-01").write_text("x")


@case("func-folder-is-a-file", 73, "sub-01/func is a file, not a folder; move it away")
def _(ds, tmp, mp):
    (tmp / "out" / "sub-01").mkdir(parents=True)
    (tmp / "out" / "sub-01" / "func").write_text("x")


@case("feature-cache-under-a-file", 73, "--feature-cache")
def _(ds, tmp, mp):
    (tmp / "cachefile").write_text("x")
    return ["--feature-cache", str(tmp / "cachefile" / "sub")]


@case("database-under-a-file", 73, "dbfile is a file, not a folder")
def _(ds, tmp, mp):
    (tmp / "dbfile").write_text("x")
    return ["--bids-database-dir", str(tmp / "dbfile" / "sub")]


@case("feature-cache-read-only", 73, "give --feature-cache a folder you can write to")
def _(ds, tmp, mp):
    cache = tmp / "cache"
    cache.mkdir()
    real = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == cache else real(p, mode, *a, **k))
    return ["--feature-cache", str(cache)]


@case("config-value-overridden-on-the-command-line", 64, "n_permutations = 'many': expected a whole number")
def _(ds, tmp, mp):
    return _config(tmp, '[models]\nn_permutations = "many"\n') + ["--n-permutations", "100", "--feature",
                                                                    "lowlevel:word_rate", "--no-reports"]


@case("participant-folder-read-only", 73, "cannot be written to")
def _(ds, tmp, mp):
    sub = tmp / "out" / "sub-01"
    sub.mkdir(parents=True)
    real = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == sub else real(p, mode, *a, **k))


@case("disk-full", 74, os.strerror(errno.ENOSPC))  # the C library's wording, passed on by bidsenc
def _(ds, tmp, mp):
    import bidsenc._io as io_module

    real = io_module.os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(io_module.os, "fdopen", lambda fd, mode="r", *a, **k: Full(real(fd, mode, *a, **k)))


# ----------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def demo_ds(demo, tmp_path_factory):
    """The demo's raw dataset without its derivatives/fmriprep: the cases break raw files, read in the raw layout."""
    ds = tmp_path_factory.mktemp("raw-demo") / "ds"
    shutil.copytree(demo[0] / "ds", ds, copy_function=os.link,
                    ignore=lambda folder, names: ["derivatives"] if Path(folder) == demo[0] / "ds" else [])
    return ds


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_cleanly(bad, demo_ds, tmp_path, monkeypatch, capfd):
    ds = tmp_path / "ds"
    shutil.copytree(demo_ds, ds, copy_function=os.link)
    out, work = tmp_path / "out", tmp_path / "work"
    extra = bad.mutate(ds, tmp_path, monkeypatch) or []
    if "--output-dir-is-input" in extra:
        extra.remove("--output-dir-is-input")
        out = ds
    if "--output-under" in extra:
        out = Path(extra.pop(extra.index("--output-under") + 1))
        extra.remove("--output-under")
    labels = ["--participant-label", "01"]
    if "--participant-label" in extra:  # the case chooses
        i = extra.index("--participant-label")
        labels = extra[i:i + 2] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else []
        del extra[i:i + len(labels) or i + 1]
    # a quick run, except where the case sets the option (the command line would win over its config file)
    quick = {"--feature": ["lowlevel:word_rate"], "--null-draws": ["0"], "--data-scaling-seeds": ["0"],
             "--n-permutations": ["20"], "--no-reports": [], "-w": [str(work)]}
    defaults = [x for flag, values in quick.items() if flag not in extra and "--config-file" not in extra
                for x in (flag, *values)]
    before = _digest(ds)
    code = main([str(ds), str(out), "participant", *labels, "--skip-bids-validation", *defaults, *extra])
    err = capfd.readouterr().err
    assert code == bad.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR: " in line or line.startswith("bidsenc: error:")]
    assert len(errors) == 1, err
    assert bad.fragment in errors[0], errors[0]
    assert _digest(ds) == before  # the input is never modified
    if out.is_dir() and out != ds:
        assert not list(out.rglob(f"*{MARKER_SUFFIX}")), "a failed run left outputs that look complete"


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


def test_a_truncated_bold_of_one_participant_does_not_stop_the_others(demo_ds, tmp_path, capfd):
    ds = tmp_path / "ds"
    shutil.copytree(demo_ds, ds, copy_function=os.link)
    data = (ds / GLACIER).read_bytes()
    _replace(ds / GLACIER, gzip.compress(gzip.decompress(data))[: len(data) // 3])
    out = tmp_path / "out"
    code = main([str(ds), str(out), "participant", "-w", str(tmp_path / "work"), "--feature", "lowlevel:word_rate",
                 "--null-draws", "0", "--data-scaling-seeds", "0", "--n-permutations", "20",
                 "--skip-bids-validation", "--no-reports"])
    err = capfd.readouterr().err
    assert code == 0, err
    assert "skipped sub-01" in err and "truncated or corrupt" in err
    assert not list((out / "sub-01").rglob(f"*{MARKER_SUFFIX}")) if (out / "sub-01").exists() else True
    assert list((out / "sub-02").rglob(f"*{MARKER_SUFFIX}"))


def test_symbolic_links_inside_the_dataset_may_point_anywhere(demo_ds, tmp_path):
    """git-annex and DataLad datasets are links to content elsewhere: stim_file containment is by name."""
    from bidsenc.bids.discover import discover, open_dataset
    from bidsenc.cli.run import configure

    ds = tmp_path / "ds"
    shutil.copytree(demo_ds, ds, copy_function=os.link)
    annex = tmp_path / "annex" / "objects"
    annex.mkdir(parents=True)
    shutil.copy(ds / "stimuli" / "glacier_audio.wav", annex / "MD5E-s1234--abc.wav")
    (ds / "stimuli" / "glacier_audio.wav").unlink()
    (ds / "stimuli" / "glacier_audio.wav").symlink_to(annex / "MD5E-s1234--abc.wav")
    cfg = configure([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")])
    experiment = discover(open_dataset(cfg), cfg, "01")
    story = experiment.stories["glacier_audio"]
    assert story.audio == ds / "stimuli" / "glacier_audio.wav" and story.audio.resolve().parent == annex


def test_a_read_only_home_gives_matplotlib_a_private_config_dir(tmp_path):
    import subprocess
    import sys

    home = tmp_path / "not-a-folder"
    home.write_text("a file: nothing can be created under it")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    code = ("from bidsenc.cli.run import _writable_config_dirs; _writable_config_dirs(); import os; "
            "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; plt.figure(); "
            "print(os.environ['MPLCONFIGDIR'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "Matplotlib created a temporary cache directory" warnings
    assert Path(proc.stdout.strip()).is_dir()


def test_one_surface_hemisphere_missing(tmp_path, capfd):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import make_fmriprep

    ds = tmp_path / "ds"
    make_fmriprep(ds, spaces=("fsaverage6",))
    for path in ds.rglob("*hemi-R*"):
        path.unlink()
    before = _digest(ds)
    code = main([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), "--feature",
                 "lowlevel:word_rate", "--skip-bids-validation", "--no-reports", "--space", "fsaverage6"])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert code == 65 and len(errors) == 1 and "Traceback" not in err, err
    assert "hemi-L_space-fsaverage6_bold.func.gii" in errors[0] and "hemisphere L only" in errors[0]
    assert _digest(ds) == before
