"""The command line: options, configuration, outputs and every documented exit code."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import tomllib

import nibabel as nib
import pytest

from bidsenc import __version__
from bidsenc.cli import run as cli_run
from bidsenc.cli.parser import build_parser
from bidsenc.cli.run import configure

from builders import make_raw


def bidsenc(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "bidsenc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def small(tmp_path, tiny_lm):
    make_raw(tmp_path / "ds", participants=("01", "02"))
    return tmp_path / "ds", tmp_path / "out", tmp_path / "work", tiny_lm


def _run(small, *extra):
    ds, out, work, lm = small
    return bidsenc(ds, out, "participant", "-w", work, "--feature", f"lm:{lm}", *extra)


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR: " in line or line.startswith("bidsenc: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --------------------------------------------------------------------------- success

def test_version_and_help():
    code, out, _ = bidsenc("--version")
    assert code == 0 and out.strip() == f"bidsenc {__version__}" and __version__ != "0+unknown"
    code, out, _ = bidsenc("--help")
    assert code == 0
    for option in ("--participant-label", "--bids-filter-file", "--derivatives", "--stimuli-dir",
                   "--skip-bids-validation", "--work-dir", "--config-file", "--nprocs", "--mem", "--device",
                   "--random-seed", "--feature"):
        assert option in out


def test_parser_is_side_effect_free_and_makes_a_manpage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    assert list(tmp_path.iterdir()) == []
    from argparse_manpage.manpage import Manpage

    page = str(Manpage(parser))
    assert "participant\\-label" in page or "participant-label" in page


def test_participant_run_writes_logs(small):
    ds, out, work, lm = small
    code, _, err = _run(small, "--participant-label", "sub-01", "--random-seed", "7", "--features-only")
    assert code == 0, err
    exp = json.loads((out / "logs" / "experiment-sub-01.json").read_text())
    assert exp["participant"] == "01" and [r["name"] for r in exp["runs"]] == ["sub-01_task-story"]
    assert exp["stories"]["story"]["n_words"] == 2
    assert not (out / "logs" / "experiment-sub-02.json").exists()
    (run_dir,) = [p for p in (out / "logs").iterdir() if p.is_dir()]
    assert "sub-01: 1 story runs" in (run_dir / "bidsenc.log").read_text()
    features = json.loads((run_dir / "features.json").read_text())
    assert features[0]["n_layers"] == 2 and features[0]["layers"] == [0, 1, 2]
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    assert cfg["inputs"]["participant_label"] == ["01"]
    assert cfg["execution"]["random_seed"] == 7
    assert cfg["features"] == [{"kind": "lm", "model": lm}]
    assert cfg["execution"]["features_only"] is True
    # the written config is a valid --config-file: rerunning from it gives the same settings
    again = configure([str(ds), str(out), "participant", "--config-file", str(run_dir / "config.toml")])
    assert again.to_toml() == (run_dir / "config.toml").read_text()


def test_labels_from_file_and_both_spellings(small, tmp_path):
    ds, out, _, lm = small
    labels = tmp_path / "labels.txt"
    labels.write_text("sub-02\n01\n")
    cfg = configure([str(ds), str(out), "participant", "--participant_label", str(labels)])
    assert cfg.inputs.participant_label == ("02", "01")
    # removeprefix, never lstrip: a label that starts with 's', 'u' or 'b' survives
    cfg = configure([str(ds), str(out), "participant", "--participant-label", "sub-bus1", "sub"])
    assert cfg.inputs.participant_label == ("bus1", "sub")


def test_command_line_overrides_config_file(small, tmp_path):
    ds, out, _, lm = small
    conf = tmp_path / "c.toml"
    conf.write_text('[execution]\ndevice = "cpu"\nnprocs = 3\nmem_gb = "8GB"\n[[features]]\nkind = "audio"\n'
                    'model = "openai/whisper-tiny"\nlayers = "0-2"\n')
    cfg = configure([str(ds), str(out), "participant", "--config-file", str(conf), "--device", "cuda"])
    assert cfg.execution.device == "cuda" and cfg.execution.nprocs == 3 and cfg.execution.mem_gb == 8.0
    assert cfg.features[0].options == {"layers": "0-2"}
    cfg = configure([str(ds), str(out), "participant", "--config-file", str(conf), "--feature",
                     "lm:facebook/opt-125m:layers=all:dtype=float16", "--mem", "500MB"])
    assert [(f.kind, f.model, f.options) for f in cfg.features] == [
        ("lm", "facebook/opt-125m", {"layers": "all", "dtype": "float16"})]
    assert cfg.execution.mem_gb == 0.5


# --------------------------------------------------------------------------- exit codes

def test_exit_1_internal_error_writes_crash_file(small, monkeypatch, capsys):
    ds, out, work, lm = small

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("bidsenc.workflow.participant", broken)
    code = cli_run.main([str(ds), str(out), "participant", "-w", str(work), "--feature", f"lm:{lm}"])
    assert code == 1
    err = capsys.readouterr().err
    _assert_one_line_error(err, "RuntimeError: boom", "crash-")
    (crash,) = (out / "logs").glob("crash-*.txt")
    assert str(crash) in err and "Traceback" in crash.read_text()


def test_exit_16_invalid_bids(small):
    ds, _, _, _ = small
    (ds / "sub-01" / "func" / "sub-01_task-story_events.tsv").write_text(
        "onset\tduration\tstim_file\nabc\t30\tstory.wav\n")
    code, _, err = _run(small)
    assert code == 16
    # the file and what to do; the validator's issue codes (its own vocabulary) are passed on unchecked
    _assert_one_line_error(err, "fails BIDS validation", "sub-01_task-story_events.tsv",
                           "--skip-bids-validation")
    # skipping validation, bidsenc's own check still refuses the events (65)
    code, _, err = _run(small, "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "onset column must hold numbers")


def test_validation_ignores_missing_stimuli(small):
    ds, _, _, _ = small
    (ds / "stimuli" / "story.wav").unlink()  # a validator error that bidsenc reports itself
    code, _, err = _run(small, "--feature", "audio:m")
    assert code == 66
    _assert_one_line_error(err, "story.wav", "--stimuli-dir")


def test_exit_17_unknown_level(small):
    ds, out, _, lm = small
    code, _, err = bidsenc(ds, out, "subject")
    assert code == 17
    _assert_one_line_error(err, "'subject'", "participant, group")


@pytest.mark.parametrize("extra, fragments", [
    (["--participant-label", "03", "sub-04"], ["03, 04", "01, 02"]),
    (["--task", "rest"], ["rest", "tasks: story"]),
    (["--session-label", "1"], ["session"]),
])
def test_exit_18_nothing_selected(small, extra, fragments):
    code, _, err = _run(small, *extra)
    assert code == 18
    _assert_one_line_error(err, *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["{ds}", "{out}", "participant", "--no-such-option"], "--no-such-option"),
    (["{tmp}/missing", "{out}", "participant"], "does not exist"),
    (["{ds}", "{ds}", "participant"], "same folder"),
    (["{ds}", "{ds}/sub-01/out", "participant"], "inside bids_dir"),
    (["{ds}", "{out}", "participant", "-w", "{ds}/work"], "work dir"),
    (["{ds}", "{out}", "participant", "--device", "gpu"], "invalid choice"),
    (["{ds}", "{out}", "participant", "--feature", "vision:x"], "KIND:MODEL"),
    (["{ds}", "{out}", "participant", "--mem", "lots"], "--mem"),
    (["{ds}", "{out}", "participant", "--nprocs", "0"], "positive"),
    (["{ds}", "{out}", "participant", "-d", "fmriprep"], "NAME=PATH"),
    (["{ds}", "{out}", "participant", "--config-file", "{tmp}/bad.toml"], "unknown [execution] setting"),
    (["{ds}", "{out}", "participant", "--bids-filter-file", "{tmp}/bad.json"], "not valid JSON"),
])
def test_exit_64_usage(small, tmp_path, args, fragment):
    ds, out, _, lm = small
    (tmp_path / "bad.toml").write_text("[execution]\ngpus = 2\n")
    (tmp_path / "bad.json").write_text("{bold: }")
    args = [a.format(ds=ds, out=out, tmp=tmp_path) for a in args]
    code, _, err = bidsenc(*args, cwd=tmp_path)
    assert code == 64, err
    _assert_one_line_error(err, fragment)


def test_exit_64_output_under_derivatives_is_allowed(small):
    ds, _, work, lm = small
    code, _, err = bidsenc(ds, ds / "derivatives" / "bidsenc", "participant", "-w", work, "--feature", f"lm:{lm}",
                           "--skip-bids-validation", "--features-only")
    assert code == 0, err


def test_exit_65_malformed_data(small):
    ds, _, _, _ = small
    # a word timing file that is not a TextGrid
    (ds / "stimuli" / "story.tsv").unlink()
    (ds / "stimuli" / "story.TextGrid").write_text('File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin')
    code, _, err = _run(small)
    assert code == 65
    _assert_one_line_error(err, "story.TextGrid")


def test_exit_65_corrupt_bold(small):
    ds, _, _, _ = small
    (ds / "sub-01" / "func" / "sub-01_task-story_bold.nii.gz").write_bytes(b"not a nifti")
    code, _, err = _run(small, "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "sub-01_task-story_bold.nii.gz", "not a readable BOLD image")


def test_exit_65_3d_bold(small):
    ds, _, _, _ = small
    path = ds / "sub-01" / "func" / "sub-01_task-story_bold.nii.gz"
    nib.save(nib.Nifti1Image(nib.load(path).get_fdata()[..., 0], nib.load(path).affine), path)
    code, _, err = _run(small, "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "expected a 4D BOLD series")


def test_exit_65_sidecar_without_tr(small):
    ds, _, _, _ = small
    (ds / "task-story_bold.json").write_text(json.dumps({"TaskName": "story"}))
    code, _, err = _run(small, "--skip-bids-validation")
    assert code == 65
    _assert_one_line_error(err, "RepetitionTime")


def test_exit_66_missing_inputs(small):
    ds, _, _, _ = small
    (ds / "stimuli" / "story.tsv").unlink()
    code, _, err = _run(small)
    assert code == 66
    _assert_one_line_error(err, "no word timing for story story", "--word-timing")
    # an explicit timing file fixes it
    table = ds.parent / "words.csv"
    table.write_text("word,start,end\nhello,1.0,1.4\n")
    code, _, err = _run(small, "--word-timing", f"story.wav={table}", "--features-only")
    assert code == 0, err


def test_exit_66_no_story_runs(small):
    ds, _, _, _ = small
    for events in ds.glob("sub-*/func/*_events.tsv"):
        events.write_text("onset\tduration\ttrial_type\n0\t10\trest\n")
    code, _, err = _run(small)
    assert code == 66
    _assert_one_line_error(err, "no run that presents a story", "names no stim_file")


def test_exit_73_output_cannot_be_created(small, tmp_path):
    ds, _, work, lm = small
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = bidsenc(ds, blocker / "out", "participant", "-w", work)
    assert code == 73
    _assert_one_line_error(err, "cannot create")


def test_exit_74_io_error(small, monkeypatch, capsys):
    ds, out, work, lm = small

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("bidsenc.workflow.atomic_write_text", disk_full)
    code = cli_run.main([str(ds), str(out), "participant", "-w", str(work), "--feature", f"lm:{lm}"])
    assert code == 74
    _assert_one_line_error(capsys.readouterr().err, "No space left on device", "experiment-sub-01.json")
    assert not (out / "logs" / "experiment-sub-01.json").exists()


def test_exit_75_cuda_asked_but_absent(small):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here; this checks the message where there is none")
    code, _, err = _run(small, "--device", "cuda")
    assert code == 75
    _assert_one_line_error(err, "--device cuda", "--gpus all", "--device cpu")


def test_device_is_logged(small):
    ds, out, _, lm = small
    code, _, err = _run(small, "--device", "cpu", "--features-only")
    assert code == 0 and "device: CPU" in err


def test_exit_65_too_little_data_to_fit(small):
    code, _, err = _run(small, "--participant-label", "01")
    assert code == 65
    # 2x2x2 voxels: too small for an EPI mask, so every voxel is fitted; 30 volumes are too few
    _assert_one_line_error(err, "too little data to cross-validate", "12 volumes left out on each side")


def test_exit_66_model_not_available_offline(small):
    code, _, err = _run(small, "--feature", "lm:some-org/no-such-model")
    assert code == 66
    _assert_one_line_error(err, "some-org/no-such-model", "--allow-download")


def test_one_participants_missing_input_does_not_stop_the_others(small):
    ds, _, _, _ = small
    (ds / "sub-01" / "func" / "sub-01_task-story_events.tsv").write_text(
        "onset\tduration\ttrial_type\tstim_file\n3.0\t30.0\tstory\tmissing.wav\n")
    code, _, err = _run(small, "--skip-bids-validation")
    assert "skipped sub-01: sub-01:" not in err  # the label is said once
    assert "skipped sub-01" in err and "skipped sub-02" in err  # sub-02 was still tried (its 30 volumes are too few)
    assert code == 66  # nobody left: the first participant's exit code
    _assert_one_line_error(err, "none of the 2 participants could be analysed; first: sub-01")


def test_thread_limits_apply(small):
    ds, out, work, lm = small
    code, _, err = bidsenc(ds, out, "participant", "-w", work, "--feature", f"lm:{lm}", "--skip-bids-validation",
                           "--omp-nthreads", "1")
    assert "device: CPU, 1 thread(s)" in err


def test_error_messages_are_one_line():
    from bidsenc.errors import DataError

    err = DataError("bad.tsv: unreadable (Error tokenizing data. C error: Expected 2 fields in line 3, saw 3\n)")
    assert "\n" not in err.message and err.message.endswith("saw 3 )")


@pytest.mark.parametrize("toml, args, fragment", [
    ('[models]\nn_permutations = "many"\n', [], "[models] n_permutations = 'many': expected a whole number"),
    ("[outputs]\nceiling_threshold = \"high\"\n", [], "[outputs] ceiling_threshold = 'high': expected a number"),
    ('[outputs]\nreports = "false"\n', [], "[outputs] reports = 'false': expected true or false"),
    ("[models]\nfdr_q = 5\n", [], "fdr_q must lie strictly between 0 and 1"),
    ("[models]\nceiling_floor = 2\n", [], "ceiling_floor must lie between 0 and 1"),
    ("[models]\nbootstraps = 2.5\n", [], "[models] bootstraps = 2.5: expected a whole number"),
    ("[models]\ntest_stories = [1, 2]\n", [], "expected a list of strings"),
    ('[features]\nkind = "lm"\nmodel = "x"\n', [], "[[features]]"),
    ("models = 3\n", [], "models must be a table"),
    ("", ["--n-permutations", "0"], "n_permutations must be a positive whole number"),
    ("", ["--n-permutations", "-5"], "n_permutations must be a positive whole number"),
    ("", ["--mem", "0"], "--mem"),
    ("", ["--ceiling-threshold", "-3"], "ceiling_threshold must lie between 0 and 1"),
    ("", ["--bootstrap-chunks", "0"], "bootstrap_chunks must be a positive integer"),
])
def test_every_setting_is_checked_before_any_work(tmp_path, toml, args, fragment):
    """Types and ranges of config-file and command-line values: one UsageError (exit 64) naming the setting."""
    from bidsenc.cli.run import configure
    from bidsenc.errors import UsageError

    make_raw(tmp_path / "ds", participants=("01",))
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(UsageError) as err:
        configure([str(tmp_path / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                   "--config-file", str(tmp_path / "c.toml"), *args])
    assert fragment in err.value.message and "\n" not in err.value.message
    assert err.value.exit_code == 64
    assert not (tmp_path / "out").exists()
