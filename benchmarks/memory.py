"""Benchmark: peak memory of a participant run against its number of voxels.

For each voxel count (20,000, 50,000 and 100,000 by default) this builds a raw BIDS
dataset of one participant (``--stories`` stories of ``--volumes`` volumes in all, TR 2 s,
uncompressed NIfTI on a grid of that many voxels, responses that follow the word rate
plus noise, word tables) with a mask of every voxel, and runs the real command line
(``python -m bidsenc DS OUT participant --feature lowlevel:word_rate --mem MEM``) in a
child process. The child's peak resident memory comes from ``getrusage`` after it exits,
its wall time from the clock, and its largest arrays from its own account of them under
``--mem`` (the ``memory:`` log line: what the process held before reading the responses,
the responses kept, and what was left for ridge batches).

Prints one line per size, then ``peak_rss_ratio_100k_to_20k=<x>`` last (the goal is at
most 5.5: memory should grow no faster than the data, with a fixed part on top). Each run
must stay under the ``--mem`` it was given (checked; a run over it is reported).

The ds003020 scale (27,000 volumes, 95,000 voxels: 10 GB of float32 responses, and
10 GB of NIfTI on disk) is ``--volumes 27000 --voxels 95000 --stories 80``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TR = 2.0


def make_dataset(root: Path, n_voxels: int, n_volumes: int, n_stories: int, seed: int = 0) -> Path:
    """One participant, ``n_stories`` stories (the last heard twice, as the test story), one word table each."""
    import nibabel as nib
    import pandas as pd

    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_voxels ** (1 / 3)))
    shape = (side, side, int(np.ceil(n_voxels / side / side)))
    mask = np.zeros(shape, bool)
    mask.reshape(-1)[:n_voxels] = True
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    (root / "stimuli").mkdir(parents=True)
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "memory", "BIDSVersion": "1.9.0"}))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), root / "mask.nii.gz")
    per_story = n_volumes // (n_stories + 1)
    gain = rng.normal(0, 0.3, n_voxels).astype(np.float32)
    runs = [(f"story{k}", "") for k in range(n_stories - 1)] + [(f"story{n_stories - 1}", f"_run-{r}") for r in (1, 2)]
    for story, run in runs:
        words = np.sort(rng.uniform(10, per_story * TR - 10, int(per_story * TR * 2.5)))
        if not (root / "stimuli" / f"{story}.tsv").exists():
            pd.DataFrame({"word": ["w"] * len(words), "start": words, "end": words + 0.3}).to_csv(
                root / "stimuli" / f"{story}.tsv", sep="\t", index=False)
        rate = np.histogram(words, bins=per_story, range=(0, per_story * TR))[0].astype(np.float32)
        rate = (rate - rate.mean()) / (rate.std() + 1e-6)
        bold = np.zeros(shape + (per_story,), np.float32)
        for t0 in range(0, per_story, 64):  # in slabs of volumes, to keep this script's own memory low
            t1 = min(per_story, t0 + 64)
            values = 1000 + gain[:, None] * rate[None, t0:t1] + rng.normal(0, 1, (n_voxels, t1 - t0))
            bold.reshape(-1, per_story)[:n_voxels, t0:t1] = values
        name = f"sub-01_task-{story}{run}"
        img = nib.Nifti1Image(bold, affine)
        img.header.set_zooms((3.0, 3.0, 3.0, TR))
        nib.save(img, func / f"{name}_bold.nii")
        (func / f"{name}_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": story}))
        pd.DataFrame({"onset": [0.0], "duration": [per_story * TR], "stim_file": [f"{story}.wav"]}).to_csv(
            func / f"{name}_events.tsv", sep="\t", index=False)
        del bold
    return root


def peak_rss_of(command: list[str]) -> tuple[int, float, int, str]:
    """Run ``command``; return its exit code, wall time (s), peak RSS (bytes) and its log, via a one-child wrapper."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "code = subprocess.call(sys.argv[1:]); "
               "print(code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    code, wall, kib = out.stdout.split()[-3:]
    return int(code), float(wall), int(kib) * 1024, out.stderr


def memory_line(log: str) -> str:
    """The run's own account of its largest arrays (logged under ``--mem``), or its last error line."""
    lines = [line for line in log.splitlines() if " memory: " in line or "error" in line.lower()]
    return lines[-1].split(": ", 1)[-1].strip() if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    parser.add_argument("--volumes", type=int, default=3000, help="volumes in all (default: 3000)")
    parser.add_argument("--stories", type=int, default=9)
    parser.add_argument("--mem", default="16GB")
    parser.add_argument("--keep", type=Path, help="build the datasets here and keep them")
    args = parser.parse_args()
    from bidsenc.config import parse_mem_gb

    limit = parse_mem_gb(args.mem) * 1e9
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for n in args.voxels:
            ds = make_dataset(base / f"ds-{n}", n, args.volumes, args.stories)
            out, work = base / f"out-{n}", base / f"work-{n}"
            command = [sys.executable, "-m", "bidsenc", str(ds), str(out), "participant", "-w", str(work),
                       "--mask", str(ds / "mask.nii.gz"), "--feature", "lowlevel:word_rate", "--mem", args.mem,
                       "--null-draws", "0", "--data-scaling-seeds", "0", "--n-permutations", "100",
                       "--skip-bids-validation", "--no-reports", "--nprocs", str(os.cpu_count())]
            code, wall, rss, log = peak_rss_of(command)
            responses = args.volumes * n * 4
            results[n] = rss
            print(f"voxels={n} volumes={args.volumes} exit={code} wall_s={wall:.1f} peak_rss_gb={rss / 1e9:.2f} "
                  f"responses_gb={responses / 1e9:.2f} rss_over_responses={rss / responses:.2f} "
                  f"under_mem={'yes' if rss <= limit else 'NO'}", flush=True)
            print(f"  largest arrays: {memory_line(log)}", flush=True)
            if not args.keep:  # the next size's dataset needs the disk
                for folder in (ds, out, work):
                    shutil.rmtree(folder, ignore_errors=True)
    small, large = min(results), max(results)
    if large != small:
        print(f"peak_rss_ratio_{large // 1000}k_to_{small // 1000}k={results[large] / results[small]:.2f}")


if __name__ == "__main__":
    main()
