"""Builders of small test datasets shaped like real ones (ds003020, Narratives, fMRIPrep)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import soundfile as sf

STIM_RATE = 1000  # Hz: audio content is irrelevant to discovery, keep files small


def tiny_bold(path: Path, n_volumes: int, tr: float = 2.0, shape=(2, 2, 2)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(n_volumes).normal(100, 1, (*shape, n_volumes)).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    nib.save(img, path)


def write_textgrid(path: Path, words: list[str], step: float = 0.4, start: float = 0.5) -> None:
    """A two-tier (phone, word) long-format TextGrid, as ds003020 ships them."""
    from praatio import textgrid
    from praatio.utilities.constants import Interval

    end = start + step * len(words) + 1
    ivs = [Interval(start + i * step, start + (i + 1) * step - 0.05, w) for i, w in enumerate(words)]
    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("phones", [Interval(i.start, i.end, i.label[:1]) for i in ivs], 0, end))
    tg.addTier(textgrid.IntervalTier("words", ivs, 0, end))
    path.parent.mkdir(parents=True, exist_ok=True)
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def make_ds003020(root: Path, meta: Path, n_voxels: int = 20, with_hdf5: bool = True) -> dict:
    """sub-UTS01 of ds003020 from its real metadata, with generated responses and TextGrids."""
    root.mkdir(parents=True, exist_ok=True)
    for f in meta.iterdir():
        if f.is_file() and f.name != "README.txt":
            shutil.copy(f, root / f.name)
    respdict = json.loads((meta / "derivative" / "respdict.json").read_text())
    (root / "derivative").mkdir(exist_ok=True)
    shutil.copy(meta / "derivative" / "respdict.json", root / "derivative" / "respdict.json")
    runs = sorted((meta / "sub-UTS01").glob("ses-*/func/*_bold.json"))
    story_runs: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for sidecar in runs:
        rel = sidecar.relative_to(meta)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sidecar, root / rel)
        task = sidecar.name.split("task-")[1].split("_")[0]
        n = respdict.get(task, 40)
        tiny_bold(root / str(rel).replace("_bold.json", "_bold.nii.gz"), n)
        if task in respdict:
            story_runs[task] = story_runs.get(task, 0) + 1
    for story in story_runs:
        write_textgrid(root / "derivative" / "TextGrids" / f"{story}.TextGrid",
                       [f"{story[:4]}{i}" for i in range(30)] + ["sp", "br"])
        if with_hdf5:
            path = root / "derivative" / "preprocessed_data" / "UTS01" / f"{story}.hf5"
            path.parent.mkdir(parents=True, exist_ok=True)
            n = respdict[story] - 20
            with h5py.File(path, "w") as fh:
                if story_runs[story] > 1:
                    reps = rng.normal(0, 1, (story_runs[story], n, n_voxels)).astype(np.float32)
                    fh["individual_repeats"] = reps
                    fh["data"] = reps.mean(0)
                else:
                    fh["data"] = rng.normal(0, 1, (n, n_voxels)).astype(np.float32)
    return {"story_runs": story_runs, "respdict": respdict}


def make_narratives(root: Path, meta: Path, tasks: dict[str, str]) -> dict:
    """Narratives-shaped dataset from the real events.tsv/bold.json of ``tasks`` ({task: subject dir}).

    Audio files are generated to last until the end of the last row that names them;
    a Gentle ``align.csv`` is written for each, with one unaligned word.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dataset_description.json", "participants.tsv", "participants.json", "README"):
        shutil.copy(meta / name, root / name)
    expected = {}
    for task, sub in tasks.items():
        events_src = next((meta / sub / "func").glob(f"{sub}_task-{task}*_events.tsv"))
        bold_json = events_src.with_name(events_src.name.replace("_events.tsv", "_bold.json"))
        func = root / sub / "func"
        func.mkdir(parents=True, exist_ok=True)
        shutil.copy(events_src, func / events_src.name)
        shutil.copy(bold_json, func / bold_json.name)
        events = pd.read_csv(events_src, sep="\t", na_values="n/a")
        tr = json.loads(bold_json.read_text())["RepetitionTime"]
        end = float((events.onset + events.duration).max())
        tiny_bold(func / events_src.name.replace("_events.tsv", "_bold.nii.gz"), math.ceil(end / tr) + 5, tr)
        stims = events.dropna(subset=["stim_file"]).groupby("stim_file").agg(
            first=("onset", "min"), last=("onset", "max"), end=("duration", "last"))
        for stim, row in stims.iterrows():
            duration = float(row["last"] - row["first"] + row["end"])
            audio = root / "stimuli" / stim
            audio.parent.mkdir(parents=True, exist_ok=True)
            sf.write(audio, np.zeros(int(duration * STIM_RATE), dtype=np.float32), STIM_RATE)
            gentle = root / "stimuli" / "gentle" / stim.removesuffix("_audio.wav") / "align.csv"
            gentle.parent.mkdir(parents=True, exist_ok=True)
            lines = [f"w{i},w{i},{20 + i:.2f},{20.5 + i:.2f}" for i in range(10)]
            lines[4] = "uh,,,"  # a word Gentle did not find in the audio
            gentle.write_text("\n".join(lines) + "\n")
            expected[stim] = {"onset": float(row["first"]), "duration": duration}
    return expected


def make_raw(root: Path, participants=("01",), n_volumes: int = 30) -> None:
    """A small raw dataset: per participant one story run (TR 1.5 s) with a word table."""
    (root / "stimuli").mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    (root / "README").write_text("A small test dataset.\n")
    (root / "task-story_bold.json").write_text(json.dumps({"TaskName": "story", "RepetitionTime": 1.5}))
    for label in participants:
        func = root / f"sub-{label}" / "func"
        tiny_bold(func / f"sub-{label}_task-story_bold.nii.gz", n_volumes, 1.5)
        pd.DataFrame({"onset": [3.0], "duration": [30.0], "trial_type": ["story"],
                      "stim_file": ["story.wav"]}).to_csv(func / f"sub-{label}_task-story_events.tsv",
                                                          sep="\t", index=False)
    sf.write(root / "stimuli" / "story.wav", np.zeros(30 * STIM_RATE, dtype=np.float32), STIM_RATE)
    pd.DataFrame({"word": ["one", "two"], "onset": [1.0, 2.0], "offset": [1.5, 2.5]}).to_csv(
        root / "stimuli" / "story.tsv", sep="\t", index=False)


def make_fmriprep(root: Path, spaces=("MNI152NLin2009cAsym", "fsaverage6"), n_volumes: int = 30) -> None:
    """:func:`make_raw` plus fMRIPrep outputs in ``spaces``."""
    make_raw(root, n_volumes=n_volumes)
    fp = root / "derivatives" / "fmriprep"
    fp.mkdir(parents=True)
    (fp / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}]}))
    ffunc = fp / "sub-01" / "func"
    sidecar = json.dumps({"RepetitionTime": 1.5, "SliceTimingCorrected": True, "StartTime": 0.7})
    for space in spaces:
        if space.startswith("fsaverage"):
            for hemi in "LR":
                darrays = [nib.gifti.GiftiDataArray(np.zeros(10, dtype=np.float32)) for _ in range(n_volumes)]
                name = f"sub-01_task-story_hemi-{hemi}_space-{space}_bold.func.gii"
                ffunc.mkdir(parents=True, exist_ok=True)
                nib.save(nib.gifti.GiftiImage(darrays=darrays), ffunc / name)
                (ffunc / name.replace(".func.gii", ".json")).write_text(sidecar)
        else:
            base = f"sub-01_task-story_space-{space}"
            tiny_bold(ffunc / f"{base}_desc-preproc_bold.nii.gz", n_volumes, 1.5)
            (ffunc / f"{base}_desc-preproc_bold.json").write_text(sidecar)
            nib.save(nib.Nifti1Image(np.ones((2, 2, 2), dtype=np.uint8), np.eye(4)),
                     ffunc / f"{base}_desc-brain_mask.nii.gz")


def make_drifting_story(root: Path, *, shift: float = 0.0, effect: float = 0.5, minutes: float = 12.0,
                        tr: float = 2.0, shape=(10, 10, 9), seed: int = 0) -> dict:
    """One story heard once, responses dominated by slow drift, with a small known word-rate effect.

    The single-story, drift-heavy situation in which an unfiltered fit scores a misaligned
    stimulus almost as well as the real one. Speech rate wanders slowly (so word rate has
    slow components that can mimic drift); each voxel's response is ``effect`` times the
    HRF-convolved word rate (unit variance), plus a random walk and slow cosines (sd about
    3 together), plus white noise (sd 1). ``shift`` seconds are added to the story's onset
    in events.tsv only: with a shift, the stimulus the model sees is misaligned.
    Returns what was simulated: the voxels' true correlation with the signal.
    """
    from bidsenc.synth.bold import canonical_hrf

    rng = np.random.default_rng(seed)
    onset, duration = 4.0, minutes * 60
    n_vol = math.ceil((onset + duration + 12) / tr)
    # words: a slowly wandering rate between about 1 and 4 words/s
    t, words, starts, ends = 0.5, [], [], []
    rate = np.cumsum(rng.normal(0, 0.05, int(duration) + 1))
    rate = 2.5 + 1.2 * np.tanh(rate - rate.mean())
    while t < duration - 1:
        step = 1.0 / rate[int(t)]
        words.append(f"w{len(words) % 50}")
        starts.append(t)
        ends.append(t + 0.8 * step)
        t += step * rng.uniform(0.6, 1.4)
    dt = 0.1
    grid = np.zeros(int((onset + duration) / dt) + n_vol * int(tr / dt))
    for s, e in zip(starts, ends, strict=True):
        grid[int((onset + (s + e) / 2) / dt)] += 1
    signal = np.convolve(grid, canonical_hrf(dt))[: len(grid)]
    signal = signal[np.minimum(((np.arange(n_vol) + 0.5) * tr / dt).astype(int), len(grid) - 1)]
    signal = (signal - signal.mean()) / signal.std()
    n_vox = int(np.prod(shape))
    walk = np.cumsum(rng.normal(0, 1, (n_vol, n_vox)), axis=0)
    walk = (walk - walk.mean(0)) / walk.std(0)
    times = np.arange(n_vol) * tr
    cosines = sum(rng.normal(0, 1, n_vox) * np.cos(2 * np.pi * times[:, None] / period + rng.uniform(0, 6.3, n_vox))
                  for period in (duration * 2, duration, 300.0))
    bold = effect * signal[:, None] + 2.0 * walk + 1.5 * cosines + rng.normal(0, 1, (n_vol, n_vox))
    (root / "stimuli").mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "drift", "BIDSVersion": "1.9.0",
                                                               "License": "CC-BY-4.0"}))
    (root / "README").write_text("A generated single-story dataset with slow drift.\n")
    (root / "task-story_bold.json").write_text(json.dumps({"TaskName": "story", "RepetitionTime": tr}))
    func = root / "sub-01" / "func"
    func.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image((100 + bold.T.reshape(*shape, n_vol)).astype(np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    nib.save(img, func / "sub-01_task-story_bold.nii.gz")
    pd.DataFrame({"onset": [onset + shift], "duration": [duration], "trial_type": ["story"],
                  "stim_file": ["story.wav"]}).to_csv(func / "sub-01_task-story_events.tsv", sep="\t", index=False)
    sf.write(root / "stimuli" / "story.wav", np.zeros(int(duration * STIM_RATE), dtype=np.float32), STIM_RATE)
    pd.DataFrame({"word": words, "onset": starts, "offset": ends}).to_csv(root / "stimuli" / "story.tsv", sep="\t",
                                                                          index=False)
    true_r = effect / np.sqrt(effect**2 + np.var(bold - effect * signal[:, None], axis=0))
    return {"n_voxels": n_vox, "n_volumes": n_vol, "true_r": true_r}
