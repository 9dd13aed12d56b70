"""``bidsenc-demo``: generate, run, and check against the generator's truth, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bidsenc.cli.demo", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "matches truth.json" in proc.stdout
    assert proc.stdout.count("mean test r") == 3 * 8  # 3 participants x (5 models + 2 baselines + stacking)
    root = tmp_path / "demo"
    truth = json.loads((root / "truth.json").read_text())
    for label in truth["participants"]:
        exp = json.loads((root / "out" / "logs" / f"experiment-sub-{label}.json").read_text())
        assert exp["repeats"] == truth["subjects"][label]["repeats"]
    models = json.loads((root / "models" / "models.json").read_text())["models"]
    assert {m["kind"] for m in models} == {"lm", "encoder-lm", "audio"}
    assert sum(m["kind"] == "lm" for m in models) == 3
    config = (root / "bidsenc.toml").read_text()
    assert all(str(root / "models" / m["path"]) in config for m in models)
    assert "step = 0.5" in config  # the demo's Whisper windows (docs/benchmarks.md: effect of the step)
    features = json.loads(next((root / "out" / "logs").glob("*/features-sub-01.json")).read_text())
    assert [f["options"].get("step") for f in features if f["kind"] == "audio"] == [0.5]
    # the demo ends with valid derivatives, a report per participant and the group scaling report
    out = root / "out"
    assert "group.html" in proc.stdout
    for label in truth["participants"]:
        maps = "*_statmap.nii.gz" if truth["subjects"][label]["kind"] == "volume" else "*_hemi-L_*_statmap.func.gii"
        assert len(list((out / f"sub-{label}" / "func").glob(maps))) >= 5 * 7
        assert (out / f"sub-{label}.html").stat().st_size > 100_000
    # the misaligned-stimulus null beside every model, and every model against the low-level baselines
    report = (out / "sub-01.html").read_text()
    assert "misaligned mean r" in report and "voxels above misaligned 95%" in report
    import pandas as pd

    summary = pd.read_csv(next((out / "sub-01").rglob("*_desc-models_summary.tsv")), sep="\t", na_values="n/a")
    best = summary[summary["best"] & ~summary["model"].isin(["stacked", "banded"])]
    assert len(best) == 7 and best["null_mean_r"].notna().all() and best["fraction_above_null"].notna().all()
    assert {"lowlevel-word_rate", "lowlevel-envelope"} <= set(best["model"])
    from bidsenc.derivatives import read_participant

    stacked = read_participant(out, "01").stacked
    assert len(stacked.names) == 5 and not any(n.startswith("lowlevel-") for n in stacked.names)  # models only
    group = (out / "group.html").read_text()
    assert "Against low-level baselines" in group and "misaligned_mean_r" in group
    baselines = pd.read_csv(out / "group" / "desc-baselines_summary.tsv", sep="\t")
    assert set(baselines["model"]) == set(best["model"]) - {"lowlevel-word_rate", "lowlevel-envelope"}
    sizes = (out / "group" / "desc-sizescaling_summary.tsv").read_text()
    assert "gpt2\twhole brain\tmean_r" in sizes  # the tiny GPT-2 family at three sizes
    # the input (raw, and its fMRIPrep-layout derivatives) and the outputs are valid BIDS
    exe = Path(sys.executable).parent / "bids-validator-deno"
    for folder in (root / "ds", root / "ds" / "derivatives" / "fmriprep", out):
        report = json.loads(subprocess.run([str(exe), "--format", "json", str(folder)], capture_output=True,
                                           text=True, timeout=300).stdout)
        assert not [i for i in report["issues"]["issues"] if i["severity"] == "error"], folder
    _check_maps_follow_the_truth(root, truth)


def _check_maps_follow_the_truth(root: Path, truth: dict) -> None:
    """The best language model's test r map follows the simulated driven share, in the volume and on the surface."""
    import nibabel as nib
    import numpy as np
    from scipy.stats import spearmanr

    from bidsenc.derivatives import read_participant

    kinds = {label: subject["kind"] for label, subject in truth["subjects"].items()}
    assert kinds == {"01": "volume", "02": "volume", "03": "surface"}
    for label, subject in truth["subjects"].items():
        result = read_participant(root / "out", label)
        if subject["kind"] == "volume":
            assert result.space.kind == "volume" and result.space.name == "MNI152NLin2009aAsym"
            signal = nib.load(root / subject["arrays"]["signal"])
            assert signal.shape == result.space.mask.shape and np.allclose(signal.affine, result.space.affine)
            share = np.asarray(signal.dataobj)[result.space.mask]
        else:
            assert result.space.kind == "surface" and result.space.name == "fsaverage5"
            parts = [nib.load(root / path).darrays[0].data for path in subject["arrays"]["signal"]]
            assert [len(p) for p in parts] == list(result.space.n_vertices) == [10242, 10242]
            share = np.concatenate(parts)
        # the language model chosen without the test data: the best mean cross-validated training score
        lms = [m for m in result.models if m.description.get("kind") in ("lm", "encoder-lm")]
        best = max(lms, key=lambda m: float(np.mean(m.stat("cv_score"))))
        rho = spearmanr(best.score_r, share[result.valid]).statistic
        # measured here (seed 0): 0.56, 0.49 and, on the surface with half the training stories, 0.25
        assert rho >= {"01": 0.5, "02": 0.4, "03": 0.15}[label], (label, best.name, rho)
    # the two MNI participants share a template: group maps and their test, drawn in the group report
    group = root / "out" / "group"
    r_maps = sorted(group.glob("space-MNI152NLin2009aAsym_desc-*_stat-r_statmap.nii.gz"))
    assert len(r_maps) >= 5, sorted(p.name for p in group.iterdir())
    assert all((group / m.name.replace("_stat-r_", f"_stat-{stat}_")).exists()
               for m in r_maps for stat in ("t", "fdr"))
    report = (root / "out" / "group.html").read_text()
    maps = report[report.index('id="maps"'):]
    assert "MNI152NLin2009aAsym: group maps of 2 participants" in maps
    assert "sub-03: the only participant in fsaverage5, no group map there" in report


def test_demo_detects_a_mismatch(tmp_path):
    """The self-check is real: a truth that disagrees with the data is reported and fails."""
    from bidsenc.cli.demo import compare_with_truth

    logs = tmp_path / "logs"
    logs.mkdir()
    run = {"name": "sub-01_task-a", "n_volumes": 10, "segments": [{"story": "a", "onset": 10.0}]}
    found = {"runs": [run], "repeats": {}, "skipped": [], "stories": {"a": {"n_words": 5}}}
    (logs / "experiment-sub-01.json").write_text(json.dumps(found))
    truth = {"subjects": {"01": {"runs": [run], "repeats": {}, "skipped": []}}, "stories": {"a": {"n_words": 5}}}
    assert compare_with_truth(truth, logs) == []
    truth["subjects"]["01"]["runs"] = [dict(run, segments=[{"story": "a", "onset": 0.0}])]
    truth["stories"]["a"]["n_words"] = 6
    assert compare_with_truth(truth, logs) == ["sub-01_task-a: volumes or segments differ",
                                               "sub-01: story a word count differs"]
