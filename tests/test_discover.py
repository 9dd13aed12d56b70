"""Discovery of runs, stories, words and repeats on the demo data and real-shaped datasets."""

from __future__ import annotations

import json

import pytest

from bidsenc.bids.discover import discover, open_dataset, select_participants
from bidsenc.cli.run import configure
from bidsenc.config import FeatureSpec
from bidsenc.errors import DataError, MissingInputError, NoDataSelectedError, UsageError

from builders import make_ds003020, make_fmriprep, make_narratives
from conftest import shared


def _experiment(bids_dir, tmp_path, label, *extra):
    cfg = configure([str(bids_dir), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"), *extra])
    dataset = open_dataset(cfg)
    return dataset, discover(dataset, cfg, label)


# --------------------------------------------------------------------------- demo vs truth

def test_demo_discovery_matches_truth(demo, tmp_path):
    root, truth = demo
    cfg = configure([str(root / "ds"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")])
    dataset = open_dataset(cfg)
    assert select_participants(dataset, cfg) == truth["participants"]
    for label, subject in truth["subjects"].items():
        exp = discover(dataset, cfg, label).to_dict()
        assert exp["layout"] == "raw"
        found = {r["name"]: r for r in exp["runs"]}
        assert sorted(found) == sorted(r["name"] for r in subject["runs"])
        for run in subject["runs"]:
            assert found[run["name"]]["n_volumes"] == run["n_volumes"]
            assert found[run["name"]]["tr"] == truth["tr"]
            assert found[run["name"]]["segments"] == run["segments"]
        assert exp["repeats"] == subject["repeats"]
        assert [s["name"] for s in exp["skipped"]] == subject["skipped"]
        assert set(exp["stories"]) == set(truth["stories"])
        for sid, story in truth["stories"].items():
            assert exp["stories"][sid]["n_words"] == story["n_words"], sid
            assert exp["stories"][sid]["duration"] == pytest.approx(story["duration"], abs=1e-3)
            assert exp["stories"][sid]["presentations"] == (3 if story["role"] == "test" else 1)


def test_demo_uses_three_timing_formats(demo, tmp_path):
    root, truth = demo
    _, exp = _experiment(root / "ds", tmp_path, "01")
    sources = {exp.stories[sid].words.source.name for sid in truth["stories"]}
    assert any(s.endswith(".TextGrid") for s in sources)
    assert "align.csv" in sources
    assert any(s.endswith(".tsv") for s in sources)
    # the music-intro run: audio starts at the music row, words keep their audio-relative times
    orchard = next(r for r in exp.runs if r.entities["task"] == "orchard")
    assert orchard.segments[0].onset == 4.0
    assert exp.stories["orchard_audio"].words.onsets[0] > 6.0
    harbor = next(r for r in exp.runs if r.entities["task"] == "harbor")
    assert harbor.segments[0].onset == -2.0


def test_filters_select_and_report(demo, tmp_path):
    root, _ = demo
    _, exp = _experiment(root / "ds", tmp_path, "01", "--session-label", "2")
    assert {r.entities["ses"] for r in exp.runs} == {"2"}
    assert exp.presentations()["festival_audio"] == 2
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"bold": {"task": "festival"}}))
    _, exp = _experiment(root / "ds", tmp_path, "01", "--bids-filter-file", str(filt))
    assert [r.entities["run"] for r in exp.runs] == ["1", "2", "3"]
    with pytest.raises(NoDataSelectedError, match="tasks: canyon, festival"):
        _experiment(root / "ds", tmp_path, "01", "-t", "nosuchtask")


# --------------------------------------------------------------------------- ds003020

def test_ds003020_layout(tmp_path):
    meta = shared("ds003020-meta")
    info = make_ds003020(tmp_path / "ds", meta)
    _, exp = _experiment(tmp_path / "ds", tmp_path, "UTS01", "--feature", "lm:some/model")
    assert exp.layout == "ds003020"
    sess = json.loads((meta / "deep-fMRI-dataset" / "em_data" / "sess_to_story.json").read_text())
    # every localizer of ses-1 is skipped, with its reason, never an error
    skipped = {s.name: s.reason for s in exp.skipped}
    assert len(skipped) == 8 and all("Localizer" in n for n in skipped)
    assert all("presents no story" in r for r in skipped.values())
    # the test story is heard five times in this participant's sessions; hdf5 preferred
    assert exp.repeated_stories == ["wheretheressmoke"]
    assert exp.presentations()["wheretheressmoke"] == info["story_runs"]["wheretheressmoke"] == 5
    smoke = [r for r in exp.runs if r.entities["task"] == "wheretheressmoke"]
    assert [r.bold.repeat for r in smoke] == [0, 1, 2, 3, 4]
    assert all(r.bold.kind == "hdf5" and r.bold.key == "individual_repeats" for r in smoke)
    train_stories = {s for sessions in sess.values() for s in sessions[0]}
    found = {r.entities["task"] for r in exp.runs} - {"wheretheressmoke"}
    assert found <= train_stories and len(found) == len(exp.runs) - 5
    for run in exp.runs:
        assert run.n_volumes == info["respdict"][run.entities["task"]] - 20
        assert run.trimmed_start == 10 and run.tr == 2.0
        assert run.segments[0].onset == 10.0
    # TextGrid words: the word tier, with 'sp'/'br' non-words dropped from the count
    assert exp.to_dict()["stories"]["wheretheressmoke"]["n_words"] == 30


def test_ds003020_without_hdf5_reads_nifti(tmp_path):
    info = make_ds003020(tmp_path / "ds", shared("ds003020-meta"), with_hdf5=False)
    _, exp = _experiment(tmp_path / "ds", tmp_path, "UTS01", "--feature", "lm:m")
    run = exp.runs[0]
    assert run.bold.kind == "nifti" and run.trimmed_start == 0
    assert run.n_volumes == info["respdict"][run.entities["task"]]


def test_ds003020_audio_required_for_audio_features(tmp_path):
    from bidsenc.features import extract

    make_ds003020(tmp_path / "ds", shared("ds003020-meta"))
    _, exp = _experiment(tmp_path / "ds", tmp_path, "UTS01", "--feature", "audio:m")
    with pytest.raises(MissingInputError, match="need audio; story"):
        extract([FeatureSpec.parse("audio:m")], exp.stories, store=None)


# --------------------------------------------------------------------------- Narratives

def test_narratives_events(tmp_path):
    meta = shared("ds002345-meta")
    tasks = {"pieman": "sub-001", "slumlordreach": "sub-016", "schema": "sub-049", "milkyway": "sub-023"}
    expected = make_narratives(tmp_path / "ds", meta, tasks)
    exps = {}
    for sub in sorted(set(tasks.values())):
        _, exps[sub] = _experiment(tmp_path / "ds", tmp_path, sub.removeprefix("sub-"))
    pieman = exps["sub-001"].runs[0]
    # the music row at 0.0 and the story row at 15.0 name the same wav: the audio starts at 0.0
    assert [(s.story_id, s.onset) for s in pieman.segments] == [("pieman_audio", 0.0)]
    # two stories in one run, each at its own row's onset; movie rows (stim_file n/a) ignored
    schema = exps["sub-049"].runs[0]
    assert [(s.story_id, s.onset) for s in schema.segments] == [("friends_audio", 199.93),
                                                                ("bigbang_audio", 558.61)]
    slumlord = exps["sub-016"].runs[0]
    assert [(s.story_id, s.onset) for s in slumlord.segments] == [("slumlordreach_audio", 4.5)]
    # milkyway plays the 'milkywayvodka' variant: the story is the stimulus, not the task
    assert list(exps["sub-023"].stories) == ["milkywayvodka_audio"]
    for stim, exp_info in expected.items():
        story_id = stim.removesuffix(".wav")
        story = next(e.stories[story_id] for e in exps.values() if story_id in e.stories)
        assert story.duration == pytest.approx(exp_info["duration"], abs=1e-3)
        assert story.words.source.name == "align.csv" and len(story.words) == 10
    assert pieman.tr == 1.5 and pieman.slice_time_ref == 0.75


def test_missing_stim_file_names_it(tmp_path):
    make_narratives(tmp_path / "ds", shared("ds002345-meta"), {"pieman": "sub-001"})
    (tmp_path / "ds" / "stimuli" / "pieman_audio.wav").unlink()
    _, exp = _experiment(tmp_path / "ds", tmp_path, "001")  # text features can still run
    story = exp.stories["pieman_audio"]
    assert story.audio is None and story.missing_audio == tmp_path / "ds" / "stimuli" / "pieman_audio.wav"
    assert exp.to_dict()["stories"]["pieman_audio"]["missing_audio"].endswith("pieman_audio.wav")
    from bidsenc.features import extract

    with pytest.raises(MissingInputError, match="pieman_audio.wav.*--stimuli-dir"):
        extract([FeatureSpec.parse("audio:m")], exp.stories, store=None)


# --------------------------------------------------------------------------- fMRIPrep

def test_fmriprep_spaces(tmp_path):
    make_fmriprep(tmp_path / "ds")
    with pytest.raises(UsageError, match="several spaces.*fsaverage6.*--space"):
        _experiment(tmp_path / "ds", tmp_path, "01", "--feature", "lm:m")
    _, exp = _experiment(tmp_path / "ds", tmp_path, "01", "--feature", "lm:m", "--space", "MNI152NLin2009cAsym")
    run = exp.runs[0]
    assert exp.layout == "fmriprep"
    assert run.bold.kind == "nifti" and run.bold.mask.name.endswith("desc-brain_mask.nii.gz")
    assert run.slice_time_ref == 0.7  # fMRIPrep's StartTime
    _, exp = _experiment(tmp_path / "ds", tmp_path, "01", "--feature", "lm:m", "--space", "fsaverage6")
    run = exp.runs[0]
    assert run.bold.kind == "gifti" and [p.name[:26] for p in run.bold.paths] == [
        "sub-01_task-story_hemi-L_s", "sub-01_task-story_hemi-R_s"]
    assert run.n_volumes == 30
    with pytest.raises(NoDataSelectedError, match="MNI152NLin2009cAsym, fsaverage6"):
        _experiment(tmp_path / "ds", tmp_path, "01", "--feature", "lm:m", "--space", "T1w")


def test_malformed_events(tmp_path):
    make_fmriprep(tmp_path / "ds", spaces=("T1w",))
    events = tmp_path / "ds" / "sub-01" / "func" / "sub-01_task-story_events.tsv"
    events.write_text("start\tstim_file\n3\tstory.wav\n")
    with pytest.raises(DataError, match="lacks the required column.*onset"):
        _experiment(tmp_path / "ds", tmp_path, "01", "--feature", "lm:m")


# --------------------------------------------------------------------------- stories by content

def test_word_rows_in_events_define_stories(tmp_path):
    """Without stim_file, the word rows of events.tsv are the story; same words = a repeat."""
    from builders import make_raw

    ds = tmp_path / "ds"
    make_raw(ds)
    func = ds / "sub-01" / "func"
    for f in func.iterdir():
        f.unlink()
    from builders import tiny_bold

    rows = "onset\tduration\ttrial_type\tword\n5.0\t0.4\tword\thello\n5.5\t0.3\tword\tworld\n"
    for run in (1, 2):
        tiny_bold(func / f"sub-01_task-story_run-{run}_bold.nii.gz", 20, 1.5)
        (func / f"sub-01_task-story_run-{run}_events.tsv").write_text(rows)
    tiny_bold(func / "sub-01_task-other_bold.nii.gz", 20, 1.5)
    (ds / "task-other_bold.json").write_text('{"TaskName": "other", "RepetitionTime": 1.5}')
    (func / "sub-01_task-other_events.tsv").write_text(rows.replace("world", "there"))
    _, exp = _experiment(ds, tmp_path, "01", "--feature", "lm:m")
    assert exp.presentations() == {"task-story": 2, "task-other": 1}
    words = exp.stories["task-story"].words
    assert list(words.words) == ["hello", "world"] and list(words.onsets) == [5.0, 5.5]
    assert all(seg.onset == 0.0 for run in exp.runs for seg in run.segments)


def test_word_rows_with_stim_file_are_made_relative_to_the_audio(tmp_path):
    from builders import make_raw

    ds = tmp_path / "ds"
    make_raw(ds)
    (ds / "stimuli" / "story.tsv").unlink()
    (ds / "sub-01" / "func" / "sub-01_task-story_events.tsv").write_text(
        "onset\tduration\ttrial_type\tstim_file\tword\n3.0\t30\tstory\tstory.wav\tn/a\n"
        "4.0\t0.4\tword\tn/a\thello\n4.5\t0.4\tword\tn/a\tworld\n")
    _, exp = _experiment(ds, tmp_path, "01", "--feature", "lm:m")
    assert exp.runs[0].segments[0].onset == 3.0
    assert list(exp.stories["story"].words.onsets) == [1.0, 1.5]


def test_same_content_under_another_name_is_a_repeat(tmp_path):
    from builders import make_raw

    ds = tmp_path / "ds"
    make_raw(ds)
    func = ds / "sub-01" / "func"
    import shutil

    shutil.copy(ds / "stimuli" / "story.wav", ds / "stimuli" / "story_copy.wav")
    shutil.copy(ds / "stimuli" / "story.tsv", ds / "stimuli" / "story_copy.tsv")
    shutil.copy(func / "sub-01_task-story_bold.nii.gz", func / "sub-01_task-story_run-2_bold.nii.gz")
    (func / "sub-01_task-story_run-2_events.tsv").write_text(
        "onset\tduration\tstim_file\n2.0\t30\tstory_copy.wav\n")
    _, exp = _experiment(ds, tmp_path, "01")
    assert exp.repeated_stories == ["story"]
    assert [seg.onset for run in exp.runs for seg in run.segments] == [3.0, 2.0]
    assert any("same audio and words" in note for note in exp.notes)


def test_a_negative_event_duration_is_named_in_a_warning(tmp_path, caplog):
    from builders import make_raw

    ds = tmp_path / "ds"
    make_raw(ds)
    (ds / "sub-01" / "func" / "sub-01_task-story_events.tsv").write_text(
        "onset\tduration\ttrial_type\tstim_file\n3.0\t-30\tstory\tstory.wav\n")
    with caplog.at_level("WARNING", logger="bidsenc"):
        _, exp = _experiment(ds, tmp_path, "01", "--feature", "lm:m")
    assert exp.runs[0].segments[0].onset == 3.0  # the story is still placed by its onset
    assert "sub-01_task-story_events.tsv: 1 event(s) with a negative duration (row 1: -30 s)" in caplog.text
