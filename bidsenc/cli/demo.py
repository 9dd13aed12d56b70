"""``bidsenc-demo DIR``: generate the demo dataset and run bidsenc on it.

Writes ``DIR/ds`` (BIDS, with the BOLD in ``ds/derivatives/fmriprep``: two participants
on the MNI152 grid, one on fsaverage5), ``DIR/truth.json``, tiny local models in ``DIR/models``
and the outputs in ``DIR/out``, compares what bidsenc found with the truth, and
ends with the group-level scaling report ``DIR/out/group.html``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidsenc-demo", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("bidsenc-demo"),
                        help="where to write the demo (default: ./bidsenc-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the dataset even if it exists")
    return parser


def compare_with_truth(truth: dict, logs_dir: Path) -> list[str]:
    """Differences between discovered experiments and the generator's truth (empty when equal)."""
    problems = []
    for label, subject in truth["subjects"].items():
        path = logs_dir / f"experiment-sub-{label}.json"
        if not path.is_file():
            problems.append(f"sub-{label}: {path.name} missing")
            continue
        found = json.loads(path.read_text())
        runs = {r["name"]: r for r in found["runs"]}
        if sorted(runs) != sorted(r["name"] for r in subject["runs"]):
            problems.append(f"sub-{label}: runs differ")
        if subject.get("space") and any(r.get("bold", {}).get("space") != subject["space"] for r in found["runs"]):
            problems.append(f"sub-{label}: BOLD not read in {subject['space']}")
        for expected in subject["runs"]:
            got = runs.get(expected["name"])
            if got and (got["n_volumes"] != expected["n_volumes"] or got["segments"] != expected["segments"]):
                problems.append(f"{expected['name']}: volumes or segments differ")
        if found["repeats"] != subject["repeats"]:
            problems.append(f"sub-{label}: repeats {found['repeats']} != {subject['repeats']}")
        if sorted(s["name"] for s in found["skipped"]) != sorted(subject["skipped"]):
            problems.append(f"sub-{label}: skipped runs differ")
        heard = {segment["story"] for run in subject["runs"] for segment in run["segments"]}
        for sid, story in truth["stories"].items():
            if sid in heard and found["stories"].get(sid, {}).get("n_words") != story["n_words"]:
                problems.append(f"sub-{label}: story {sid} word count differs")
    return problems


def print_scores(out: Path, truth: dict) -> None:
    """Per participant and model: the best layer's mean test r and fraction of the noise ceiling."""
    import pandas as pd

    for label in truth["subjects"]:
        paths = sorted((out / f"sub-{label}").rglob("*_desc-models_summary.tsv"))
        if not paths:
            continue
        table = pd.read_csv(paths[0], sep="\t", na_values="n/a")
        best = table[table["best"]]
        print(f"bidsenc-demo: sub-{label}, best layer of each model (chosen by cross-validated training score):")
        for row in best.itertuples():
            layer = "best" if row.layer < 0 else row.layer
            print(f"    {row.model:<40} layer {layer!s:>4}  mean test r {row.mean_r:6.3f}  "
                  f"fraction of ceiling {row.fraction_of_ceiling:5.2f}")


def main(argv: list[str] | None = None) -> int:
    from ..synth import make_demo
    from .run import main as bidsenc_main

    args = build_parser().parse_args(argv)
    directory = args.directory.absolute()
    truth_path = directory / "truth.json"
    if args.regenerate or not truth_path.is_file() or not (directory / "bidsenc.toml").is_file():
        t0 = time.perf_counter()
        print(f"bidsenc-demo: generating the demo dataset in {directory / 'ds'} ...", flush=True)
        make_demo(directory, seed=args.seed)
        print(f"bidsenc-demo: dataset, ground truth and tiny models written in {time.perf_counter() - t0:.0f} s")
    truth = json.loads(truth_path.read_text())
    spaces = ", ".join(f"sub-{label} in {subject.get('space', 'its own space')}"
                       for label, subject in truth["subjects"].items())
    print(f"bidsenc-demo: participant level ({spaces}): features of 5 models (computed once, then cached), "
          "encoding models, maps and reports ...", flush=True)
    t0 = time.perf_counter()
    code = bidsenc_main([str(directory / "ds"), str(directory / "out"), "participant",
                         "--config-file", str(directory / "bidsenc.toml")])
    if code != 0:
        return code
    problems = compare_with_truth(truth, directory / "out" / "logs")
    for problem in problems:
        print(f"bidsenc-demo: MISMATCH {problem}", file=sys.stderr)
    n_runs = sum(len(s["runs"]) for s in truth["subjects"].values())
    print(f"bidsenc-demo: discovery of {len(truth['subjects'])} participants, {n_runs} story runs and "
          f"{len(truth['stories'])} stories " + ("matches truth.json" if not problems else "DIFFERS from truth.json"))
    print(f"bidsenc-demo: participant level done in {time.perf_counter() - t0:.0f} s")
    print_scores(directory / "out", truth)
    print("bidsenc-demo: group level: scaling report ...", flush=True)
    code = bidsenc_main([str(directory / "ds"), str(directory / "out"), "group",
                         "--config-file", str(directory / "bidsenc.toml")])
    if code != 0:
        return code
    print(f"bidsenc-demo: outputs in {directory / 'out'}; reports: "
          + ", ".join(f"sub-{label}.html" for label in truth["subjects"]) + ", group.html")
    return 1 if problems else 0


def entry_point() -> None:
    try:
        code = main()
    except Exception as err:  # bidsenc's own errors end inside main; this is the demo's own set-up
        from ..errors import broken_package

        broken = broken_package(err)
        if broken is None:
            raise
        print(f"bidsenc-demo: error: {broken.message}", file=sys.stderr)
        code = broken.exit_code
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
