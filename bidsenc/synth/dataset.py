"""Write the demo dataset: BIDS story-listening fMRI with a known ground truth.

Layout of ``DIR`` after :func:`make_demo`:

``ds/``          the BIDS dataset (2 participants, 2 sessions, TR 2 s)
``truth.json``   what bidsenc should discover and the simulation's parameters
``truth/``       arrays: brain mask, per-voxel true noise ceiling, SNR, weights
``models/``      tiny Hugging Face models saved locally (see :mod:`.models`)
``bidsenc.toml`` a config file that points bidsenc at those models
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import soundfile as sf

from .bold import DT, response_at_volumes, slow_drift, word_feature_grid
from .stimuli import SAMPLE_RATE, make_story_words, make_vocabulary, synthesize_speech

TR = 2.0
#: Audio window step of the demo's config, in seconds (the reference, and bidsenc's default, is 0.1).
DEMO_AUDIO_STEP = 0.5
#: Low-level baseline feature spaces of the demo's config.
DEMO_BASELINES = ("word_rate", "envelope")
SHAPE = (24, 24, 14)
VOXEL_MM = 3.0
TRAIN_STORIES = ("lighthouse", "orchard", "harbor", "glacier", "market", "canyon", "meadow", "lantern")
TEST_STORY = "festival"
N_TEST_REPEATS = 3
TRAIN_SECONDS = 120.0
TEST_SECONDS = 200.0
TIMING_FORMATS = ("textgrid", "gentle", "table")
EMBEDDING_DIM = 6
DRIVEN_FRACTION = 0.75
TAIL_SECONDS = 16.0
#: The true ceiling is defined over the test run without its first 100 s and last 10 s,
#: the volumes on which test scores are computed (both presets of bidsenc trim so).
CEILING_TRIM_S = (100.0, 10.0)
SESSIONS = {
    "1": ["localizer", *TRAIN_STORIES[:4], (TEST_STORY, 1)],
    "2": [*TRAIN_STORIES[4:], (TEST_STORY, 2), (TEST_STORY, 3)],
}
#: Stories whose events follow the Narratives pattern (music intro row, same wav).
MUSIC_INTRO = {"orchard": 6.0}
#: Audio onset relative to the first volume (default 10 s, as in ds003020); a negative
#: onset stands for dummy volumes removed after the sound had started.
AUDIO_ONSET = {"orchard": 4.0, "harbor": -2.0}


@dataclass
class _Story:
    name: str
    words: list[str]
    onsets: np.ndarray   # relative to the audio start
    offsets: np.ndarray
    duration: float      # audio length
    timing_format: str

    @property
    def stim_file(self) -> str:
        return f"{self.name}_audio.wav"

    @property
    def story_id(self) -> str:
        return f"{self.name}_audio"


def make_demo(directory: Path, seed: int = 0, n_participants: int = 2, with_models: bool = True) -> dict:
    """Generate the demo dataset, its ground truth and tiny models in ``directory``.

    Returns the content of ``truth.json``.
    """
    directory = Path(directory)
    ds = directory / "ds"
    (ds / "stimuli").mkdir(parents=True, exist_ok=True)
    (directory / "truth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    vocabulary = make_vocabulary(rng)
    embedding = {w: rng.normal(0, 1, EMBEDDING_DIM) for w in vocabulary}
    stories = {}
    for i, name in enumerate((*TRAIN_STORIES, TEST_STORY)):
        length = TEST_SECONDS if name == TEST_STORY else TRAIN_SECONDS
        intro = MUSIC_INTRO.get(name, 0.0)
        words, on, off = make_story_words(rng, vocabulary, length, start=intro + 0.5)
        story = _Story(name, words, on, off, length, TIMING_FORMATS[i % len(TIMING_FORMATS)])
        stories[name] = story
        audio = synthesize_speech(words, on, off, length, rng, intro=intro)
        sf.write(ds / "stimuli" / story.stim_file, audio, SAMPLE_RATE, subtype="PCM_16")
        _write_word_timing(ds / "stimuli", story)

    _write_dataset_files(ds, n_participants)
    truth = {
        "seed": seed,
        "tr": TR,
        "participants": [f"{p:02d}" for p in range(1, n_participants + 1)],
        "stories": {
            s.story_id: {
                "stim_file": s.stim_file,
                "timing_format": s.timing_format,
                "n_words": len(s.words),
                "duration": s.duration,
                "role": "test" if s.name == TEST_STORY else "train",
                "music_intro": MUSIC_INTRO.get(s.name, 0.0),
            }
            for s in stories.values()
        },
        "subjects": {},
        "simulation": {
            "features": ["word rate (words/s at onsets)", "word length (letters, while spoken)",
                         f"random word embedding ({EMBEDDING_DIM} dims, while spoken)"],
            "grid_seconds": DT,
            "hrf": "SPM double gamma (6 s, 16 s, 1/6)",
            "sampled_at": "volume midpoints (TR/2 after each volume starts)",
            "signal": "unit variance per driven voxel over all story volumes",
            "noise": "white Gaussian, sd = 1/snr, independent per run; plus slow drift (sd 0.3/snr)",
            "ceiling": "true CC_max of the mean of the test repeats: sqrt(var_s / (var_s + sd_noise^2 / N)) "
                       "over the test run's volumes without its first 100 s and last 10 s (drift excluded)",
            "percent_signal_change": 1.0,
        },
    }
    mask = _brain_mask()
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * VOXEL_MM / 2
    for p in truth["participants"]:
        truth["subjects"][p] = _simulate_participant(ds, directory / "truth", p, stories, embedding, mask,
                                                     affine, np.random.default_rng([seed, int(p)]))
    np.savez(directory / "truth" / "word_embedding.npz", words=np.array(vocabulary),
             vectors=np.stack([embedding[w] for w in vocabulary]))
    truth["word_embedding"] = "truth/word_embedding.npz"
    _atomic_json(directory / "truth.json", truth)
    if with_models:
        from .models import make_demo_models

        texts = [" ".join(s.words) for s in stories.values()]
        make_demo_models(directory / "models", texts, seed=seed)
        _write_config(directory)
    return truth


# --------------------------------------------------------------------------- stimuli

def _write_word_timing(stim_dir: Path, story: _Story) -> None:
    if story.timing_format == "textgrid":
        from praatio import textgrid
        from praatio.utilities.constants import Interval

        # words with "sp" silences between them, as forced aligners write them
        entries, t = [], 0.0
        for w, on, off in zip(story.words, story.onsets, story.offsets, strict=True):
            if on - t > 0.05:
                entries.append(Interval(t, on, "sp"))
            entries.append(Interval(on, off, w))
            t = off
        tg = textgrid.Textgrid()
        phones = [Interval(on, off, w[:1]) for w, on, off in zip(story.words, story.onsets, story.offsets,
                                                                  strict=True)]
        tg.addTier(textgrid.IntervalTier("phone", phones, 0, story.duration))
        tg.addTier(textgrid.IntervalTier("word", entries, 0, story.duration))
        tg.save(str(stim_dir / f"{story.story_id}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
    elif story.timing_format == "gentle":
        folder = stim_dir / "gentle" / story.name
        folder.mkdir(parents=True, exist_ok=True)
        rows = [f"{w},{w},{on:.3f},{off:.3f}" for w, on, off in zip(story.words, story.onsets, story.offsets,
                                                                     strict=True)]
        (folder / "align.csv").write_text("\n".join(rows) + "\n")
        (folder / "transcript.txt").write_text(" ".join(story.words) + "\n")
    else:
        pd.DataFrame({"word": story.words, "start": story.onsets, "end": story.offsets}).to_csv(
            stim_dir / f"{story.story_id}.tsv", sep="\t", index=False, float_format="%.3f")


# --------------------------------------------------------------------------- BIDS files

def _write_dataset_files(ds: Path, n_participants: int) -> None:
    _atomic_json(ds / "dataset_description.json", {
        "Name": "bidsenc demo: simulated story-listening fMRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bidsenc developers"],
        "GeneratedBy": [{"Name": "bidsenc.synth", "Description": "simulated data with known ground truth"}],
    })
    (ds / "README").write_text(
        "Simulated data for the bidsenc demo and tests: participants listened to synthetic stories;\n"
        "BOLD responses were simulated from known word features (see ../truth.json).\n"
    )
    pd.DataFrame({"participant_id": [f"sub-{p:02d}" for p in range(1, n_participants + 1)]}).to_csv(
        ds / "participants.tsv", sep="\t", index=False)
    for name in (*TRAIN_STORIES, TEST_STORY):
        _atomic_json(ds / f"task-{name}_bold.json", {
            "TaskName": name, "RepetitionTime": TR,
            "TaskDescription": f"Listen to the story '{name}'",
        })
    _atomic_json(ds / "task-localizer_bold.json", {"TaskName": "localizer", "RepetitionTime": TR})
    # an inherited events file, as ds003020 ships for its localizers
    pd.DataFrame({"onset": [10.0, 30.0, 50.0], "duration": [10.0] * 3,
                  "trial_type": ["hand", "foot", "mouth"]}).to_csv(
        ds / "task-localizer_events.tsv", sep="\t", index=False)


def _events(story: _Story) -> pd.DataFrame:
    onset = AUDIO_ONSET.get(story.name, 10.0)
    intro = MUSIC_INTRO.get(story.name, 0.0)
    rows = []
    if intro:
        rows.append({"onset": onset, "duration": intro, "trial_type": "music", "stim_file": story.stim_file})
    rows.append({"onset": onset + intro, "duration": story.duration - intro, "trial_type": "story",
                 "stim_file": story.stim_file})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- BOLD

def _brain_mask() -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    center = (np.array(SHAPE) - 1) / 2
    radii = np.array(SHAPE) / 2 - 1
    r = sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3))
    return r <= 1.0


def _simulate_participant(ds: Path, truth_dir: Path, label: str, stories: dict, embedding: dict,
                          mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> dict:
    n_vox = int(mask.sum())
    n_feat = 2 + EMBEDDING_DIM
    driven = rng.random(n_vox) < DRIVEN_FRACTION
    snr = np.exp(rng.uniform(np.log(0.2), np.log(2.0), n_vox))
    weights = rng.normal(0, 1, (n_feat, n_vox)) * driven
    baseline = rng.uniform(800, 1200, n_vox)

    # pass 1: noiseless responses of every run, to scale each voxel's signal to unit variance
    plan = []
    for ses, items in SESSIONS.items():
        for item in items:
            name, run = (item if isinstance(item, tuple) else (item, None))
            plan.append((ses, name, run))
    signals = {}
    feat_mean = feat_sd = None
    grids = {}
    for ses, name, run in plan:
        if name == "localizer":
            continue
        story = stories[name]
        onset = AUDIO_ONSET.get(name, 10.0)
        n_vol = math.ceil((onset + story.duration + TAIL_SECONDS) / TR)
        n_bins = int(round(n_vol * TR / DT))
        grid = word_feature_grid(n_bins, story.words, story.onsets, story.offsets, onset, embedding)
        grids[(ses, name, run)] = (response_at_volumes(grid, TR, n_vol), onset, n_vol)
    allx = np.concatenate([g[0] for g in grids.values()])
    feat_mean, feat_sd = allx.mean(0), allx.std(0)
    for key, (x, onset, n_vol) in grids.items():
        signals[key] = ((x - feat_mean) / feat_sd) @ weights
    scale = np.concatenate(list(signals.values())).std(0)
    scale[scale == 0] = 1.0

    noise_sd = 1.0 / snr
    runs, test_signal = [], None
    for ses, name, run in plan:
        run_name = f"sub-{label}_ses-{ses}_task-{name}" + (f"_run-{run}" if run else "")
        func = ds / f"sub-{label}" / f"ses-{ses}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        if name == "localizer":
            n_vol = 40
            signal = np.zeros((n_vol, n_vox))
        else:
            signal = signals[(ses, name, run)] / scale
            n_vol = signal.shape[0]
            _events(stories[name]).to_csv(func / f"{run_name}_events.tsv", sep="\t", index=False, na_rep="n/a")
            runs.append({"name": run_name, "session": ses, "task": name, "run": run, "n_volumes": n_vol,
                         "segments": [{"story": stories[name].story_id,
                                       "onset": AUDIO_ONSET.get(name, 10.0)}]})
            if name == TEST_STORY:
                test_signal = signal
        noise = rng.normal(0, 1, (n_vol, n_vox)) * noise_sd + 0.3 * noise_sd * slow_drift(rng, n_vol, TR, n_vox)
        bold = baseline * (1 + 0.01 * (signal + noise))
        vol = np.zeros((*SHAPE, n_vol), dtype=np.float32)
        vol[~mask] = rng.normal(20, 2, (int((~mask).sum()), n_vol))
        vol[mask] = bold.T
        img = nib.Nifti1Image(vol, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = TR
        nib.save(img, func / f"{run_name}_bold.nii.gz")

    # true ceiling of the mean of N repeats, over the volumes a test is scored on: all but the
    # first 100 s (language-model context start-up) and the last 10 s of the run
    scored = slice(int(CEILING_TRIM_S[0] / TR), test_signal.shape[0] - int(CEILING_TRIM_S[1] / TR))
    var_s = test_signal[scored].var(0)
    ceiling = np.sqrt(var_s / (var_s + noise_sd**2 / N_TEST_REPEATS))
    prefix = truth_dir / f"sub-{label}"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), f"{prefix}_mask.nii.gz")
    for key, arr in {"ceiling": ceiling, "snr": snr, "driven": driven, "weights": weights}.items():
        np.save(f"{prefix}_{key}.npy", arr, allow_pickle=False)
    return {
        "runs": runs,
        "skipped": [f"sub-{label}_ses-1_task-localizer"],
        "repeats": {stories[TEST_STORY].story_id: N_TEST_REPEATS},
        "n_voxels": n_vox,
        "n_driven": int(driven.sum()),
        "arrays": {k: f"truth/sub-{label}_{k}.npy" for k in ("ceiling", "snr", "driven", "weights")}
                  | {"mask": f"truth/sub-{label}_mask.nii.gz"},
    }


def _write_config(directory: Path) -> None:
    models = json.loads((directory / "models" / "models.json").read_text())
    lines = ["# bidsenc settings for the demo: the tiny local models built next to the data", "",
             "[execution]", f'work_dir = "{directory / "work"}"', ""]
    for m in models["models"]:
        kind = "audio" if m["kind"] == "audio" else "lm"
        lines += ["[[features]]", f'kind = "{kind}"', f'model = "{directory / "models" / m["path"]}"']
        if kind == "audio":
            # windows every 0.5 s instead of the reference 0.1 s: 5x less Whisper on the CPU, and still
            # well under TR / 2 (docs/benchmarks.md measures the difference)
            lines += [f"step = {DEMO_AUDIO_STEP}"]
        lines += [""]
    # the low-level baselines every model is reported against (the demo's stories have phones only in
    # some of their word-timing files, so phoneme rate is left out)
    for baseline in DEMO_BASELINES:
        lines += ["[[features]]", 'kind = "lowlevel"', f'model = "{baseline}"', ""]
    (directory / "bidsenc.toml").write_text("\n".join(lines))


def _atomic_json(path: Path, obj) -> None:
    from .._io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
