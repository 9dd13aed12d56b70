"""The command-line parser, built without side effects.

:func:`build_parser` only describes the options, so argparse-manpage and the
Boutiques descriptor can be generated from it. Options the user did not give
are absent from the parsed namespace (``argparse.SUPPRESS``), which is how the
config file's values survive unless the command line overrides them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..config import ANALYSIS_LEVELS, DEVICES
from ..errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; BIDS Apps reserve 64 for that."""

    def error(self, message):
        raise UsageError(f"{message} (see bidsenc --help)")


def _high_pass(text: str) -> float:
    if text.strip().lower() in ("none", "off"):
        return 0.0
    if "/" in text:  # 1/128
        num, _, den = text.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--high-pass {text!r}: expected a cutoff in Hz such as 0.0078 or 1/128, or none") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the ``bidsenc`` argument parser."""
    S = argparse.SUPPRESS
    parser = _Parser(
        prog="bidsenc",
        description="Voxelwise encoding models of story-listening fMRI from language and "
        "speech model features (a BIDS App).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=S,
    )
    parser.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the BIDS-Derivatives outputs go")
    parser.add_argument(
        "analysis_level",
        help=f"'participant' fits each participant; 'group' summarises their outputs ({', '.join(ANALYSIS_LEVELS)})",
    )
    parser.add_argument("--version", action="version", version=f"bidsenc {__version__}")

    g = parser.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label", "--participant_label", dest="participant_label", nargs="+",
        metavar="LABEL", help="participants to analyse, with or without 'sub-', or a file listing them "
        "(default: all)",
    )
    g.add_argument("--session-label", "--session_label", dest="session_label", nargs="+", metavar="LABEL",
                   help="sessions to use (default: all)")
    g.add_argument("-t", "--task", nargs="+", metavar="LABEL", help="tasks to use (default: all story tasks)")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help="JSON of PyBIDS queries, e.g. {\"bold\": {\"session\": \"1\"}}")
    g.add_argument("-d", "--derivatives", nargs="+", metavar="NAME=PATH",
                   help="preprocessed data, e.g. fmriprep=/data/derivatives/fmriprep "
                   "(default: bids_dir/derivatives/fmriprep when present)")
    g.add_argument("--space", metavar="SPACE",
                   help="output space of fMRIPrep data to use when several exist (e.g. MNI152NLin2009cAsym, fsaverage6, "
                        "fsLR for CIFTI grayordinates, fsLR:den-91k to choose a density)")
    g.add_argument("--stimuli-dir", type=Path, metavar="DIR",
                   help="folder holding the stimuli (default: bids_dir/stimuli)")
    g.add_argument("--mask", type=Path, metavar="FILE",
                   help="NIfTI mask on the BOLD grid of the voxels to fit (default: the runs' brain mask, else one "
                   "computed from the EPI, else every finite, non-constant voxel of a small image)")
    g.add_argument("--word-timing", dest="word_timings", nargs="+", metavar="STIM=FILE",
                   help="explicit word timing file for a stimulus (its stim_file or story id)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                   action="store_true", help="do not run the BIDS validator on bids_dir")

    g = parser.add_argument_group("features")
    g.add_argument("--feature", dest="features", action="extend", nargs="+", metavar="SPEC",
                   help="a feature space KIND:MODEL[:KEY=VALUE...], repeatable: lm (a language model), audio "
                   "(Whisper, HuBERT, WavLM) or lowlevel (the baselines word_rate, phoneme_rate, envelope), e.g. "
                   "lm:facebook/opt-125m:layers=all or lowlevel:word_rate (default: a small OPT and a small Whisper)")
    g.add_argument("--feature-cache", type=Path, metavar="DIR",
                   help="feature cache shared across jobs (default: <work-dir>/feature-cache)")
    g.add_argument("--features-only", action="store_true",
                   help="only compute the features of every story (e.g. one GPU job before participant jobs)")
    g.add_argument("--force", action="store_true",
                   help="recompute participants whose outputs are complete (by default a participant written by "
                        "this version with the same settings from the same input files is skipped, so that a "
                        "resubmitted job does only what is left)")
    g.add_argument("--allow-download", action="store_true",
                   help="let models be downloaded from the Hugging Face hub (off: local files only)")
    g.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="local copies of hub models, found as DIR/<org>/<name> before the Hugging Face cache "
                   "(default: $BIDSENC_MODEL_DIR; the container's baked models)")

    g = parser.add_argument_group("encoding models")
    g.add_argument("--preset", choices=("default", "reference"),
                   help="'reference' reproduces Antonello et al. (2023): delays across stories, TR trims, "
                   "their alpha grid, bootstrap validation score and noise-ceiling convention (default: default)")
    g.add_argument("--test-stories", nargs="+", metavar="STORY",
                   help="stories to test on (default: those heard more than once)")
    g.add_argument("--confounds", nargs="+", metavar="NAME",
                   help="fMRIPrep confounds to regress out of each run, by column name or pattern, e.g. "
                   "'trans_?' 'rot_?' 'a_comp_cor_0[0-4]' (default: none)")
    g.add_argument("--cv-score", choices=("r", "r2", "reference"),
                   help="validation score that chooses each voxel's alpha: r2, r, or reference (the reference "
                   "code's bootstrap_ridge(use_corr=False) score) (default: reference under --preset reference, "
                   "else r2)")
    g.add_argument("--bootstraps", type=int, metavar="N",
                   help="--preset reference: bootstrap splits that choose each voxel's alpha (default: 50)")
    g.add_argument("--bootstrap-chunk-len", type=int, metavar="TRS",
                   help="--preset reference: consecutive volumes per held-out chunk (default: 40)")
    g.add_argument("--bootstrap-chunks", type=int, metavar="N",
                   help="--preset reference: chunks held out per bootstrap (default: 20%% of the chunks)")
    g.add_argument("--ceiling-floor", type=float, metavar="R",
                   help="lower bound applied to the noise ceiling CC_max (default: none, also under --preset "
                   "reference, whose floor is not in effect in its code)")
    g.add_argument("--high-pass", type=_high_pass, metavar="HZ",
                   help="cosine high-pass cutoff applied per run to the responses and the features alike; 0 or "
                   "none turns it off (default: 1/128 Hz for raw and fMRIPrep inputs; none for ds003020's "
                   "cleaned files and under --preset reference)")
    g.add_argument("--n-permutations", type=int, metavar="N",
                   help="circular shifts of the prediction for the per-voxel p-values with a test story "
                   "(default: 1000; every allowed shift once when there are fewer)")
    g.add_argument("--null-draws", type=int, metavar="N",
                   help="refit each model N times on a misaligned stimulus and report its scores beside the real "
                   "ones: with a test story the chosen layer on its features circularly shifted per story; "
                   "without one the whole nested procedure on each story's stimulus rotated in time, which also "
                   "gives the p-values; 0 turns it off (default: 5)")
    g.add_argument("--data-scaling-seeds", type=int, metavar="N",
                   help="random subsets of 1, 2, 4, ... training stories per size for the data-scaling "
                   "curve; 0 turns it off (default: 3)")

    g.add_argument("--banded-ridge", dest="banded", action="store_true",
                   help="also fit every model's best layer jointly by banded ridge (himalaya multiple-kernel "
                   "ridge), the joint-fit alternative to stacking")
    g.add_argument("--save-weights", action="store_true",
                   help="keep each model's best-layer ridge weights in its array file (features x delays x voxels)")

    g = parser.add_argument_group("outputs and reports")
    g.add_argument("--map-layers", metavar="LAYERS",
                   help="layers written as maps besides each model's best: best, all, or e.g. 0,4-6 "
                   "(every layer's statistics are always kept in the model's array file; default: best)")
    g.add_argument("--atlas", nargs="+", type=Path, metavar="FILE",
                   help="regions for the group report: a NIfTI label image, or GIfTI label files "
                   "(left, right) in the participants' space")
    g.add_argument("--atlas-labels", type=Path, metavar="TSV",
                   help="the atlas's region names: a TSV with the columns index and name")
    g.add_argument("--ceiling-threshold", type=float, metavar="R",
                   help="voxels with a noise ceiling (CC_max) of at least this are summarised apart "
                   "(default: 0.3)")
    g.add_argument("--no-reports", dest="reports", action="store_false",
                   help="do not write the HTML reports")
    g.add_argument("--reports-only", action="store_true",
                   help="only rewrite the participants' HTML reports from the outputs already in output_dir")

    g = parser.add_argument_group("execution")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR", help="scratch folder (default: ./work)")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="where PyBIDS keeps its index of bids_dir, reused by later runs (default: none)")
    g.add_argument("--config-file", type=Path, metavar="FILE",
                   help="TOML settings ([inputs], [execution], [models], [outputs], [[features]]); the command line "
                   "wins")
    g.add_argument("--nprocs", "--n-cpus", dest="nprocs", type=int, metavar="N", help="CPU processes to use")
    g.add_argument("--omp-nthreads", type=int, metavar="N", help="threads per process")
    g.add_argument("--mem", "--mem-gb", dest="mem", metavar="SIZE", help="memory limit, e.g. 16GB")
    g.add_argument("--device", choices=DEVICES, help="compute device (default: auto)")
    g.add_argument("--random-seed", type=int, metavar="N", help="seed for every random choice (default: 0)")
    g.add_argument("-v", "--verbose", action="count", help="more log output (repeatable)")
    return parser
