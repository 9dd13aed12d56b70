"""Write the demo dataset: BIDS story-listening fMRI with a known ground truth.

Layout of ``DIR`` after :func:`make_demo` (``layout="template"``, the default and the demo's):

``ds/``          the raw BIDS dataset (3 participants, 2 sessions, TR 2 s): events, stimuli,
                 sidecars, and a coarse 12 mm rendering of each run's BOLD
``ds/derivatives/fmriprep/``
                 the BOLD bidsenc analyses, in fMRIPrep's output layout: sub-01 and sub-02 on
                 the MNI152 brain at 6 mm (``space-MNI152NLin2009aAsym``), sub-03 on the
                 fsaverage5 surface (``hemi-{L,R}_space-fsaverage5_bold.func.gii``)
``truth.json``   what bidsenc should discover and the simulation's parameters
``truth/``       per participant: the driven share of variance as a map on the BOLD grid
                 (``sub-XX_signal.nii.gz`` or ``sub-XX_hemi-{L,R}_signal.func.gii``), brain mask,
                 true noise ceiling, SNR, driven voxels and weights as arrays
``models/``      tiny Hugging Face models saved locally (see :mod:`.models`)
``bidsenc.toml`` a config file that points bidsenc at those models

How strongly the stories drive each place is spatially smooth: blobs at the language
network's MNI coordinates over a weak floor, in grey matter (see :mod:`.brain`).

``layout="raw"`` writes the BOLD itself in ``ds/`` (raw BIDS, no derivatives) on a small
ellipsoid grid (24 x 24 x 14 voxels of 3 mm, 2808 in the "brain") whose driven voxels and
signal-to-noise ratios are drawn independently per voxel: a dataset that many tests share
because it is quick to fit and exercises bidsenc's raw-BIDS path.
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
from .brain import (BLOB_FWHM_MM, FLOOR_SHARE, GREY_MATTER, SURFACE, TEMPLATE, TUNING_FWHM_MM, VOXEL_MM, Layout,
                    driven_share, participant_regions, smooth_weights, surface_layout, volume_layout)
from .stimuli import SAMPLE_RATE, make_story_words, make_vocabulary, synthesize_speech

TR = 2.0
#: Audio window step of the demo's config, in seconds (the reference, and bidsenc's default, is 0.1).
DEMO_AUDIO_STEP = 0.5
#: Misaligned-stimulus draws and data-scaling seeds of the demo's config (bidsenc's defaults: 5 and 3).
DEMO_NULL_DRAWS = 2
DEMO_SCALING_SEEDS = 1
#: Low-level baseline feature spaces of the demo's config.
DEMO_BASELINES = ("word_rate", "envelope")
#: Spatial smoothness (FWHM, mm) of the template layout's noise in a volume: 1.5 voxels, as unsmoothed fMRI.
NOISE_FWHM_MM = 1.5 * VOXEL_MM
#: Participants 1 to N_VOLUME_PARTICIPANTS are on the MNI152 grid, later ones on fsaverage5.
N_VOLUME_PARTICIPANTS = 2
#: Voxel size of the template layout's raw BOLD (mm): a cheap, coarse rendering; bidsenc reads fMRIPrep's.
COARSE_VOXEL_MM = 2 * VOXEL_MM
#: The raw layout: its grid, voxel size (mm) and share of its voxels driven by the stimulus.
RAW_SHAPE = (24, 24, 14)
RAW_LAYOUT_VOXEL_MM = 3.0
RAW_DRIVEN_FRACTION = 0.75
LAYOUTS = ("template", "raw")
TRAIN_STORIES = ("lighthouse", "orchard", "harbor", "glacier", "market", "canyon", "meadow", "lantern")
TEST_STORY = "festival"
N_TEST_REPEATS = 3
TRAIN_SECONDS = 120.0
TEST_SECONDS = 200.0
TIMING_FORMATS = ("textgrid", "gentle", "table")
EMBEDDING_DIM = 6
TAIL_SECONDS = 16.0
#: The true ceiling is defined over the test run without its first 100 s and last 10 s,
#: the volumes on which test scores are computed (both presets of bidsenc trim so).
CEILING_TRIM_S = (100.0, 10.0)
SESSIONS = {
    "1": ["localizer", *TRAIN_STORIES[:4], (TEST_STORY, 1)],
    "2": [*TRAIN_STORIES[4:], (TEST_STORY, 2), (TEST_STORY, 3)],
}
#: The surface participant hears session 2's test repeats only: half the training stories, so that its
#: 20484 vertices cost the demo less time (its feature spaces are the same; it has its own ceiling).
SURFACE_SESSIONS = {"1": SESSIONS["1"], "2": [item for item in SESSIONS["2"] if isinstance(item, tuple)]}
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


_SIMULATION_COMMON = {
    "features": ["word rate (words/s at onsets)", "word length (letters, while spoken)",
                 f"random word embedding ({EMBEDDING_DIM} dims, while spoken)"],
    "grid_seconds": DT,
    "hrf": "SPM double gamma (6 s, 16 s, 1/6)",
    "sampled_at": "volume midpoints (TR/2 after each volume starts)",
    "ceiling": "true CC_max of the mean of the test repeats: sqrt(var_s / (var_s + sd_noise^2 / N)) "
               "over the test run's volumes without its first 100 s and last 10 s (drift excluded)",
}
_TEMPLATE_SIMULATION = {
    "signal": "features (z-scored) x weights, scaled per driven voxel to sd = snr over all story "
              "volumes; weights: each language region's own tuning near it over a mix of random tunings "
              f"that drifts over {TUNING_FWHM_MM:g} mm, the embedding's dimensions scaled by 1/sqrt(dims) so "
              "that word rate, word length and the embedding drive equal shares on average",
    "noise": "white Gaussian, sd 1, independent per run and voxel; plus slow drift (sd 0.3)",
    "units": "signal and noise in percent of each voxel's baseline intensity",
    "driven_share": f"share of a voxel's variance over all story volumes that the stimulus drives, "
                    f"drift excluded: snr^2 / (snr^2 + 1); a floor of {FLOOR_SHARE} plus Gaussian blobs "
                    f"(FWHM {BLOB_FWHM_MM:g} mm) at the language regions of each participant (truth.json "
                    "subjects.*.regions), times the voxel's grey matter (nilearn's MNI152 grey-matter "
                    f"probability, 0 at or below {GREY_MATTER[0]}, 1 at or above {GREY_MATTER[1]}); 0 on "
                    "fsaverage5's medial wall (thickness < 1 mm): the truth/*_signal maps",
    "percent_signal_change": "signal sd = snr percent of the baseline (at most 3)",
    "arrays": "per participant (subjects.*.arrays), one value per voxel or vertex in the BOLD's order "
              "(mask voxels in C order; left then right hemisphere): ceiling, snr, driven (bool), "
              "weights (features x voxels); signal: the driven share as a map on the BOLD grid "
              "(NIfTI; a [left, right] pair of GIfTI files on a surface); mask (volumes only)",
    "surface_participants": f"participants after sub-{N_VOLUME_PARTICIPANTS:02d} are simulated on "
                            f"{SURFACE} and hear session 2's test repeats only (fewer training stories)",
}
_RAW_SIMULATION = {
    "signal": "unit variance per driven voxel over all story volumes; weights random per voxel",
    "noise": "white Gaussian, sd = 1/snr, independent per run; plus slow drift (sd 0.3/snr)",
    "driven": f"{RAW_DRIVEN_FRACTION:.0%} of the voxels, at random; snr log-uniform in [0.2, 2]",
    "percent_signal_change": 1.0,
}


def participant_kind(label: str) -> str:
    """``"volume"`` (MNI152 grid) for the first :data:`N_VOLUME_PARTICIPANTS` participants, else ``"surface"``."""
    return "volume" if int(label) <= N_VOLUME_PARTICIPANTS else "surface"


def make_demo(directory: Path, seed: int = 0, n_participants: int | None = None, with_models: bool = True,
              layout: str = "template") -> dict:
    """Generate the demo dataset, its ground truth and tiny models in ``directory``.

    Parameters
    ----------
    directory : Path
        Where ``ds/``, ``truth.json``, ``truth/``, ``models/`` and ``bidsenc.toml`` go.
    seed : int
        Seed of everything random (stories, audio, responses, models).
    n_participants : int, optional
        3 by default for the template layout (participants 1 and 2 on the MNI152 grid, a third
        and any later one on fsaverage5), 2 for the raw layout.
    with_models : bool
        Also build the tiny local models and the config file that points at them.
    layout : {"template", "raw"}
        fMRIPrep-layout derivatives in template spaces with a spatially smooth truth, or raw
        BIDS on a small ellipsoid grid (see the module's docstring).

    Returns
    -------
    dict
        The content of ``truth.json``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if n_participants is None:
        n_participants = 3 if layout == "template" else 2
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

    _write_dataset_files(ds, n_participants, layout)
    if layout == "template":
        _write_fmriprep_description(ds)
    truth = {
        "seed": seed,
        "tr": TR,
        "layout": layout,
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
        "simulation": _SIMULATION_COMMON | (_TEMPLATE_SIMULATION if layout == "template" else _RAW_SIMULATION),
    }
    if layout == "template":
        truth["spaces"] = {
            TEMPLATE: f"nilearn's MNI152 brain mask (ICBM152 2009 release a, asymmetric) at {VOXEL_MM} mm",
            SURFACE: "nilearn's fsaverage5 meshes, vertices halfway between the white and pial surfaces",
        }
    for p in truth["participants"]:
        rng_p = np.random.default_rng([seed, int(p)])
        if layout == "raw":
            truth["subjects"][p] = _simulate_raw_participant(ds, directory / "truth", p, stories, embedding, rng_p)
        else:
            place = volume_layout() if participant_kind(p) == "volume" else surface_layout()
            truth["subjects"][p] = _simulate_participant(ds, directory / "truth", p, stories, embedding, place,
                                                         rng_p)
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

def _write_dataset_files(ds: Path, n_participants: int, layout: str) -> None:
    _atomic_json(ds / "dataset_description.json", {
        "Name": "bidsenc demo: simulated story-listening fMRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bidsenc developers"],
        "GeneratedBy": [{"Name": "bidsenc.synth", "Description": "simulated data with known ground truth"}],
    })
    where = ("The responses to\nanalyse are in derivatives/fmriprep (fMRIPrep's layout, template spaces); func/ "
             "holds a coarse\n12 mm rendering of the same series.\n" if layout == "template" else "\n")
    (ds / "README").write_text(
        "Simulated data for the bidsenc demo and tests: participants listened to synthetic stories;\n"
        "BOLD responses were simulated from known word features (see ../truth.json). " + where)
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

MASK_DESCRIPTION = f"nilearn's MNI152 brain mask at {VOXEL_MM} mm: the voxels the simulation drew responses for"


def _write_fmriprep_description(ds: Path) -> Path:
    fmriprep = ds / "derivatives" / "fmriprep"
    fmriprep.mkdir(parents=True, exist_ok=True)
    _atomic_json(fmriprep / "dataset_description.json", {
        "Name": "bidsenc demo: simulated BOLD in fMRIPrep's output layout",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "bidsenc.synth",
            "Description": "BOLD simulated directly in template spaces and written in fMRIPrep's output layout "
                           "(file names, brain masks, sidecars); not produced by fMRIPrep",
        }],
        "SourceDatasets": [{"URL": "../../"}],
    })
    # BIDS 1.10 has no file rule for surface BOLD series (*_bold.func.gii), which fMRIPrep writes: the
    # validator would call each one, and its sidecar, an error
    (fmriprep / ".bidsignore").write_text(f"*_bold.func.gii\n*_space-{SURFACE}_bold.json\n")
    (fmriprep / "README").write_text(
        f"Simulated BOLD of the bidsenc demo, in fMRIPrep's output layout: sub-01 to sub-{N_VOLUME_PARTICIPANTS:02d} on\n"
        f"nilearn's MNI152 brain mask at {VOXEL_MM} mm ({TEMPLATE}), any later participant on the fsaverage5\n"
        "surface. It was not made by fMRIPrep: the responses were simulated in these spaces directly, and the\n"
        "raw dataset's func/ images are a coarse 12 mm rendering of the same series. See ../../../truth.json.\n"
    )
    return fmriprep


def _story_plan(kind: str = "volume") -> list[tuple[str, str, str | None]]:
    """(session, task, run) of every run of a participant of this kind, in order."""
    plan = []
    for ses, items in (SESSIONS if kind == "volume" else SURFACE_SESSIONS).items():
        for item in items:
            name, run = (item if isinstance(item, tuple) else (item, None))
            plan.append((ses, name, None if run is None else str(run)))
    return plan


def _white_noise(rng: np.random.Generator, n_vol: int, layout: Layout) -> np.ndarray:
    """[T, V] noise of sd 1 per voxel, independent in time; in a volume, as smooth in space as fMRI's.

    Unsmoothed fMRI noise is correlated between neighbouring voxels (its smoothness is about 1.5
    voxels, FWHM): the errors of a score map are then patches, not single voxels. On a surface,
    vertices (about 7 mm apart on fsaverage5) are left independent.
    """
    if layout.kind != "volume":
        return rng.normal(0, 1, (n_vol, layout.n))
    from scipy.ndimage import gaussian_filter

    sigma = NOISE_FWHM_MM / VOXEL_MM / (2 * np.sqrt(2 * np.log(2)))
    field = rng.normal(0, 1, (n_vol, *layout.mask.shape))
    smooth = gaussian_filter(field, sigma=(0, sigma, sigma, sigma))[:, layout.mask]
    # the filter's own variance reduction (sum of squared weights), measured on a unit impulse
    impulse = np.zeros((9, 9, 9))
    impulse[4, 4, 4] = 1.0
    gain = np.sqrt((gaussian_filter(impulse, sigma) ** 2).sum())
    return smooth / gain


def _noiseless_signals(plan: list, stories: dict, embedding: dict,
                       weights: np.ndarray) -> tuple[dict, np.ndarray]:
    """Noiseless responses ``{(session, task, run): [T, V]}`` of every story run, and each voxel's sd over all.

    The features are z-scored over all the participant's story volumes before the weights apply.
    """
    grids = {}
    for ses, name, run in plan:
        if name == "localizer":
            continue
        story = stories[name]
        onset = AUDIO_ONSET.get(name, 10.0)
        n_vol = math.ceil((onset + story.duration + TAIL_SECONDS) / TR)
        n_bins = int(round(n_vol * TR / DT))
        grid = word_feature_grid(n_bins, story.words, story.onsets, story.offsets, onset, embedding)
        grids[(ses, name, run)] = response_at_volumes(grid, TR, n_vol)
    allx = np.concatenate(list(grids.values()))
    feat_mean, feat_sd = allx.mean(0), allx.std(0)
    signals = {key: ((x - feat_mean) / feat_sd) @ weights for key, x in grids.items()}
    scale = np.concatenate(list(signals.values())).std(0)
    scale[scale == 0] = 1.0
    return signals, scale


def _simulate_participant(ds: Path, truth_dir: Path, label: str, stories: dict, embedding: dict,
                          layout: Layout, rng: np.random.Generator) -> dict:
    n_vox = layout.n
    n_feat = 2 + EMBEDDING_DIM
    regions = participant_regions(rng)
    share = driven_share(layout, regions)
    driven = share > 0
    # a driven share s of the variance over the story volumes, with noise of variance 1: signal sd
    # sqrt(s / (1 - s)) (drift excluded)
    snr = np.sqrt(share / (1 - share))
    # the three kinds of feature (word rate, word length, the embedding's dimensions together) drive
    # equal shares of the signal on average
    kinds = np.array([1.0, 1.0] + [1 / math.sqrt(EMBEDDING_DIM)] * EMBEDDING_DIM)
    weights = smooth_weights(layout, regions, n_feat, rng) * kinds[:, None]
    # brain-like intensities: brighter where the template is, a little texture per voxel
    baseline = (600 + 600 * layout.intensity) * rng.uniform(0.95, 1.05, n_vox)

    plan = _story_plan(layout.kind)
    signals, scale = _noiseless_signals(plan, stories, embedding, weights)
    gain = (snr / scale).astype(np.float32)  # each voxel's signal to sd = snr

    fmriprep = ds / "derivatives" / "fmriprep"
    runs, test_signal = [], None
    for ses, name, run in plan:
        run_name = f"sub-{label}_ses-{ses}_task-{name}" + (f"_run-{run}" if run else "")
        func = ds / f"sub-{label}" / f"ses-{ses}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        if name == "localizer":
            n_vol = 40
            signal = np.zeros((n_vol, n_vox), dtype=np.float32)
        else:
            signal = signals[(ses, name, run)] * gain
            n_vol = signal.shape[0]
            _events(stories[name]).to_csv(func / f"{run_name}_events.tsv", sep="\t", index=False, na_rep="n/a")
            if name == TEST_STORY:
                test_signal = signal
        noise = _white_noise(rng, n_vol, layout) + 0.3 * slow_drift(rng, n_vol, TR, n_vox)
        bold = (baseline * (1 + 0.01 * (signal + noise))).astype(np.float32)
        files = _write_run(fmriprep, func, run_name, ses, bold, layout, rng)
        if name != "localizer":
            runs.append({"name": run_name, "session": ses, "task": name, "run": run, "n_volumes": n_vol,
                         "segments": [{"story": stories[name].story_id,
                                       "onset": AUDIO_ONSET.get(name, 10.0)}],
                         "bold": [str(f.relative_to(ds)) for f in files]})

    # true ceiling of the mean of N repeats, over the volumes a test is scored on: all but the
    # first 100 s (language-model context start-up) and the last 10 s of the run
    scored = slice(int(CEILING_TRIM_S[0] / TR), test_signal.shape[0] - int(CEILING_TRIM_S[1] / TR))
    var_s = test_signal[scored].astype(float).var(0)
    ceiling = np.sqrt(var_s / (var_s + 1.0 / N_TEST_REPEATS))
    prefix = truth_dir / f"sub-{label}"
    arrays = {k: f"truth/sub-{label}_{k}.npy" for k in ("ceiling", "snr", "driven", "weights")}
    for key, arr in {"ceiling": ceiling, "snr": snr, "driven": driven, "weights": weights}.items():
        np.save(f"{prefix}_{key}.npy", arr, allow_pickle=False)
    if layout.kind == "volume":
        nib.save(nib.Nifti1Image(layout.mask.astype(np.uint8), layout.affine), f"{prefix}_mask.nii.gz")
        nib.save(_volume_image(share.astype(np.float32), layout, 0.0), f"{prefix}_signal.nii.gz")
        arrays |= {"mask": f"truth/sub-{label}_mask.nii.gz", "signal": f"truth/sub-{label}_signal.nii.gz"}
    else:
        arrays["signal"] = []
        for hemi, part in zip("LR", _hemispheres(share.astype(np.float32), layout), strict=True):
            nib.save(_gifti([part], hemi), f"{prefix}_hemi-{hemi}_signal.func.gii")
            arrays["signal"].append(f"truth/sub-{label}_hemi-{hemi}_signal.func.gii")
    return {
        "space": layout.space,
        "kind": layout.kind,
        "runs": runs,
        "skipped": [f"sub-{label}_ses-1_task-localizer"],
        "repeats": {stories[TEST_STORY].story_id: N_TEST_REPEATS},
        "n_voxels": n_vox,
        "n_driven": int(driven.sum()),
        "regions": regions,
        "arrays": arrays,
    }


def _hemispheres(values: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """[V, ...] over both hemispheres -> (left, right)."""
    n_left = layout.n_vertices[0]
    return values[:n_left], values[n_left:]


def _gifti(darrays: list[np.ndarray], hemi: str):
    """A GIfTI image with one float32 data array per entry, tagged with its hemisphere as FreeSurfer does."""
    structure = {"L": "CortexLeft", "R": "CortexRight"}[hemi]
    image = nib.gifti.GiftiImage(meta=nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure}))
    for data in darrays:
        image.add_gifti_data_array(nib.gifti.GiftiDataArray(np.ascontiguousarray(data, dtype=np.float32),
                                                            intent="NIFTI_INTENT_NONE",
                                                            datatype="NIFTI_TYPE_FLOAT32",
                                                            # plain base64: zlib took 8 of the demo's 30 s here
                                                            encoding="GIFTI_ENCODING_B64BIN"))
    return image


def _volume_image(values: np.ndarray, layout: Layout, background=0.0, tr: float | None = None,
                  dtype=np.float32):
    """``values`` ([V] or [T, V]) on the layout's grid; ``background`` (a number or a 3D array) outside the brain."""
    vol = np.empty(layout.mask.shape + values.shape[:-1], dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    vol[...] = bg.reshape(bg.shape + (1,) * (vol.ndim - bg.ndim)) if bg.ndim else bg
    vol[layout.mask] = values.T
    img = nib.Nifti1Image(_as(vol, dtype), layout.affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header["pixdim"][4] = tr
    return img


def _as(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` in ``dtype``, rounded for an integer type."""
    return np.rint(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values.astype(dtype)


def _raw_grid(layout: Layout) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The raw dataset's coarse grid: shape, affine and brain mask (2 x 2 x 2 blocks of the MNI grid)."""
    mask6 = volume_layout().mask if layout.kind == "surface" else layout.mask
    affine6 = volume_layout().affine if layout.kind == "surface" else layout.affine
    factor = int(round(COARSE_VOXEL_MM / VOXEL_MM))
    padded = np.pad(mask6, [(0, (-n) % factor) for n in mask6.shape])
    shape = tuple(n // factor for n in padded.shape)
    blocks = padded.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    affine = affine6.copy()
    affine[:3, :3] *= factor
    affine[:3, 3] += affine6[:3, :3] @ np.full(3, (factor - 1) / 2)  # block centres
    return shape, affine, blocks.mean(axis=(1, 3, 5)) >= 0.5


def _raw_image(bold: np.ndarray, layout: Layout, rng: np.random.Generator):
    """A coarse rendering of a run for the raw dataset (bidsenc reads fMRIPrep's outputs, not this).

    ``bold`` is the run on the MNI grid (4D, background included) for a volume layout, else
    ``[T, V]`` over the vertices.
    """
    shape, affine, mask = _raw_grid(layout)
    n_vol = bold.shape[-1] if layout.kind == "volume" else bold.shape[0]
    if layout.kind == "volume":  # the mean of each 2 x 2 x 2 block
        factor = int(round(COARSE_VOXEL_MM / VOXEL_MM))
        full = np.pad(bold, [(0, (-n) % factor) for n in layout.mask.shape] + [(0, 0)], mode="edge")
        vol = full.reshape(shape[0], factor, shape[1], factor, shape[2], factor, n_vol).mean(axis=(1, 3, 5))
    else:  # each coarse brain voxel shows the series of the vertex nearest its centre
        from scipy.spatial import cKDTree

        centres = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
        nearest = cKDTree(layout.coords).query(centres)[1]
        vol = np.empty(shape + (n_vol,), dtype=np.float32)
        vol[...] = rng.normal(20, 2, shape)[..., None]
        vol[mask] = bold[:, nearest].T
    img = nib.Nifti1Image(_as(vol, np.int16), affine)  # integers, as scanners write them
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = TR
    return img


def _write_run(fmriprep: Path, func: Path, run_name: str, ses: str, bold: np.ndarray, layout: Layout,
               rng: np.random.Generator) -> list[Path]:
    """One run: fMRIPrep's outputs (what bidsenc analyses) and the raw dataset's coarse BOLD."""
    label = run_name.split("_")[0].removeprefix("sub-")
    out = fmriprep / f"sub-{label}" / f"ses-{ses}" / "func"
    out.mkdir(parents=True, exist_ok=True)
    sidecar = {"RepetitionTime": TR, "TaskName": run_name.split("task-")[1].split("_")[0], "SkullStripped": False,
               "Description": "simulated BOLD (bidsenc.synth), written as fMRIPrep writes its preprocessed series"}
    files = []
    if layout.kind == "volume":
        # no res- entity: TemplateFlow's resolution indices for this template do not include 6 mm
        base = f"{run_name}_space-{layout.space}"
        # low scanner background around the brain: fMRIPrep's preprocessed BOLD is not skull-stripped;
        # integers (rounding adds noise of sd 0.3 against the noise's 6-12): 3x smaller and faster to
        # compress than float32
        img = _volume_image(bold, layout, rng.normal(20, 2, layout.mask.shape), TR, np.int16)
        nib.save(img, out / f"{base}_desc-preproc_bold.nii.gz")
        _atomic_json(out / f"{base}_desc-preproc_bold.json", sidecar)
        nib.save(_volume_image(np.ones(layout.n), layout, 0, dtype=np.uint8), out / f"{base}_desc-brain_mask.nii.gz")
        _atomic_json(out / f"{base}_desc-brain_mask.json", {"Type": "Brain", "Description": MASK_DESCRIPTION})
        files.append(out / f"{base}_desc-preproc_bold.nii.gz")
        raw = _raw_image(np.asarray(img.dataobj, dtype=np.float32), layout, rng)
    else:
        # float32 as fMRIPrep writes, rounded to 1/8 (noise of sd 0.04 against the noise's 6-12) so that
        # the low mantissa bits are zeros: 2x smaller and faster to compress
        series = np.round(bold.T * 8) / 8
        for hemi, part in zip("LR", _hemispheres(series, layout), strict=True):
            # hemi before space, as BIDS orders the entities and fMRIPrep names its surface outputs
            base = f"{run_name}_hemi-{hemi}_space-{layout.space}_bold"
            nib.save(_gifti(list(part.T), hemi), out / f"{base}.func.gii")
            files.append(out / f"{base}.func.gii")
        # one sidecar for both hemispheres (BIDS names no hemi- sidecar of a .func.gii); fsaverage5 is not
        # among BIDS's standard spaces, so the sidecar says what it is
        _atomic_json(out / f"{run_name}_space-{layout.space}_bold.json", sidecar | {
            "SpatialReference": "fsaverage5: FreeSurfer's fsaverage at icosahedron order 5, 10242 vertices per "
                                "hemisphere (TemplateFlow tpl-fsaverage, den-10k)"})
        raw = _raw_image(bold, layout, rng)
    nib.save(raw, func / f"{run_name}_bold.nii.gz")
    return files


# --------------------------------------------------------------------------- the raw layout

def _raw_mask() -> np.ndarray:
    grid = np.indices(RAW_SHAPE).astype(float)
    center = (np.array(RAW_SHAPE) - 1) / 2
    radii = np.array(RAW_SHAPE) / 2 - 1
    r = sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3))
    return r <= 1.0


def _simulate_raw_participant(ds: Path, truth_dir: Path, label: str, stories: dict, embedding: dict,
                              rng: np.random.Generator) -> dict:
    """One participant of the raw layout: BOLD in ``ds/sub-XX/ses-X/func`` on the ellipsoid grid."""
    mask = _raw_mask()
    affine = np.diag([RAW_LAYOUT_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -np.array(RAW_SHAPE) * RAW_LAYOUT_VOXEL_MM / 2
    n_vox = int(mask.sum())
    n_feat = 2 + EMBEDDING_DIM
    driven = rng.random(n_vox) < RAW_DRIVEN_FRACTION
    snr = np.exp(rng.uniform(np.log(0.2), np.log(2.0), n_vox))
    weights = rng.normal(0, 1, (n_feat, n_vox)) * driven
    baseline = rng.uniform(800, 1200, n_vox)
    plan = _story_plan("volume")
    signals, scale = _noiseless_signals(plan, stories, embedding, weights)

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
            signal = signals[(ses, name, run)] / scale  # unit variance
            n_vol = signal.shape[0]
            _events(stories[name]).to_csv(func / f"{run_name}_events.tsv", sep="\t", index=False, na_rep="n/a")
            runs.append({"name": run_name, "session": ses, "task": name, "run": run, "n_volumes": n_vol,
                         "segments": [{"story": stories[name].story_id,
                                       "onset": AUDIO_ONSET.get(name, 10.0)}]})
            if name == TEST_STORY:
                test_signal = signal
        noise = rng.normal(0, 1, (n_vol, n_vox)) * noise_sd + 0.3 * noise_sd * slow_drift(rng, n_vol, TR, n_vox)
        bold = baseline * (1 + 0.01 * (signal + noise))
        vol = np.zeros((*RAW_SHAPE, n_vol), dtype=np.float32)
        vol[~mask] = rng.normal(20, 2, (int((~mask).sum()), n_vol))
        vol[mask] = bold.T
        img = nib.Nifti1Image(vol, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = TR
        nib.save(img, func / f"{run_name}_bold.nii.gz")

    scored = slice(int(CEILING_TRIM_S[0] / TR), test_signal.shape[0] - int(CEILING_TRIM_S[1] / TR))
    var_s = test_signal[scored].var(0)
    ceiling = np.sqrt(var_s / (var_s + noise_sd**2 / N_TEST_REPEATS))
    prefix = truth_dir / f"sub-{label}"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), f"{prefix}_mask.nii.gz")
    for key, arr in {"ceiling": ceiling, "snr": snr, "driven": driven, "weights": weights}.items():
        np.save(f"{prefix}_{key}.npy", arr, allow_pickle=False)
    return {
        "kind": "volume",
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
             "[execution]", f'work_dir = "{directory / "work"}"', "",
             # fewer refits than the defaults (5 null draws, 3 seeds per data-scaling size) keep the demo
             # under 3 minutes on 2 cores; each still shows in the reports
             "[models]", f"null_draws = {DEMO_NULL_DRAWS}", f"data_scaling_seeds = {DEMO_SCALING_SEEDS}", ""]
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
