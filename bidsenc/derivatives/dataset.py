"""Dataset-level files of the output: description, .bidsignore, README, citation.

Their contents depend only on the version and the input, never on the participant
or the time, and every write is atomic: participant jobs running at once into one
output_dir write the same bytes, so none can leave a torn or mixed file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import __version__
from .._io import atomic_write_text

log = logging.getLogger(__name__)

#: What the BIDS specification does not know yet: statistical maps, bidsenc's array
#: files and tables, and the HTML reports. Only file patterns, never whole folders
#: of participants, so everything else is still validated.
BIDSIGNORE = """\
# bidsenc outputs the BIDS specification does not cover yet (BEP for statistical maps pending)
*_statmap.nii.gz
*_statmap.func.gii
*_statmap.dscalar.nii
*_statmap.npy
*_statmap.json
*_encoding.npz
*_encoding.json
*_summary.tsv
*_summary.json
/sub-*.html
/group.html
/group
"""

_REFERENCES = """\
- Antonello R, Vaidya A, Huth AG (2023). Scaling laws for language encoding models in fMRI.
  Advances in Neural Information Processing Systems 36.
- Schoppe O, Harper NS, Willmore BDB, King AJ, Schnupp JWH (2016). Measuring the performance of neural
  models. Frontiers in Computational Neuroscience 10:10.
- Lin R, Naselaris T, Kay K, Wehbe L (2024). Stacked regressions and structured variance partitioning
  for interpretable brain maps. NeuroImage 298:120772.
- Benjamini Y, Hochberg Y (1995). Controlling the false discovery rate. J R Stat Soc B 57:289-300.
- Dupré la Tour T, Eickenberg M, Nunez-Elizalde AO, Gallant JL (2022). Feature-space selection with
  banded ridge regression. NeuroImage 264:119728 (himalaya).
- Wolf T et al. (2020). Transformers: state-of-the-art natural language processing. EMNLP (system demos).
- Gorgolewski KJ et al. (2016). The brain imaging data structure. Scientific Data 3:160044.
"""


def container() -> dict | None:
    """bidsenc's own image when running in it: its Dockerfile sets BIDSENC_CONTAINER_TAG,
    which Singularity/Apptainer keep when they run the converted image."""
    tag = os.environ.get("BIDSENC_CONTAINER_TAG")
    if not tag:
        return None
    singularity = os.environ.get("APPTAINER_NAME") or os.environ.get("SINGULARITY_NAME")
    return {"Type": "singularity" if singularity else "docker", "Tag": tag}


def dataset_description(bids_dir: Path, derivatives: dict | None = None) -> dict:
    """The output's ``dataset_description.json``, linking the input dataset it was computed from."""
    generated = {"Name": "bidsenc", "Version": __version__,
                 "Description": "voxelwise encoding models of story-listening fMRI"}
    found = container()
    if found:
        generated["Container"] = found
    source = {"URL": bids_dir.absolute().as_uri()}
    licence = None
    try:
        raw = json.loads((bids_dir / "dataset_description.json").read_text())
        licence = raw.get("License")
        if raw.get("DatasetDOI"):
            doi = str(raw["DatasetDOI"])
            source = {"DOI": doi if doi.startswith("doi:") else f"doi:{doi.removeprefix('https://doi.org/')}"}
        if raw.get("Version"):  # the dataset's own version (BIDSVersion is the specification's)
            source["Version"] = str(raw["Version"])
    except (OSError, ValueError):
        pass
    out = {
        "Name": "bidsenc: voxelwise encoding models",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.absolute().as_uri(),
                         **{name: Path(path).absolute().as_uri() for name, path in (derivatives or {}).items()}},
        "HowToAcknowledge": "Cite Antonello, Vaidya & Huth (2023) and the works listed in logs/CITATION.md; "
                            "name bidsenc and its version.",
    }
    if licence:  # derived data stay under the source's terms
        out["License"] = str(licence)
        out["HowToAcknowledge"] += (f" These outputs derive from the source dataset and carry its license "
                                    f"({licence}); acknowledge it as its authors ask.")
    return out


def existing_version(output_dir: Path) -> str | None:
    """The bidsenc version that wrote ``output_dir`` before, if any."""
    try:
        described = json.loads((output_dir / "dataset_description.json").read_text())
        return next((g.get("Version") for g in described.get("GeneratedBy", []) if g.get("Name") == "bidsenc"),
                    None)
    except (OSError, ValueError):
        return None


def write_dataset_files(output_dir: Path, bids_dir: Path, derivatives: dict | None = None) -> None:
    """Write (or refresh) the dataset-level files; warn when another version wrote output_dir before."""
    output_dir.mkdir(parents=True, exist_ok=True)
    before = existing_version(output_dir)
    if before is not None and before != __version__:
        log.warning("%s holds results of bidsenc %s; this is bidsenc %s. Participants keep the version "
                    "that wrote them, and the group level uses only those of one version: rerun the others, "
                    "or write to a new output_dir", output_dir, before, __version__)
    atomic_write_text(output_dir / "dataset_description.json",
                      json.dumps(dataset_description(bids_dir, derivatives), indent=2) + "\n")
    atomic_write_text(output_dir / ".bidsignore", BIDSIGNORE)
    atomic_write_text(output_dir / "README.md", _README)
    (output_dir / "logs").mkdir(exist_ok=True)
    atomic_write_text(output_dir / "logs" / "CITATION.md", citation_text())


def citation_text() -> str:
    """The methods boilerplate and references for a paper's methods section."""
    return f"""# Methods (generated by bidsenc {__version__})

Voxelwise encoding models were estimated with bidsenc {__version__}, which follows
Antonello, Vaidya & Huth (2023). For every story, the hidden states of each layer of each
language model were taken at the last sub-token of every word, computed from a context that
ends at that word; audio models were run on causal 16.1 s windows every 0.1 s. Features were
resampled to the times of the volumes with a Lanczos filter (window 3, cutoff at the Nyquist
rate of the scans), delayed by finite impulse response delays spanning 2-8 s within each run,
trimmed at the start and end of each run and z-scored. Responses were cleaned per run
(detrending with nilearn) and z-scored. Ridge regression with one regularisation parameter per
voxel, chosen by leave-stories-out cross-validation on the training stories, was fitted for
every layer; each model's layer was chosen by its cross-validated training score. Models were
scored by the Pearson correlation between predicted and measured responses on held-out test
stories averaged over repeats, and normalised by the noise ceiling CC_max (Schoppe et al. 2016);
without a repeated test story, by an outer cross-validation over stories (or buffered blocks of
one story) in which each outer fold chose the regularisation and the layer from its own training
data (nested). As a misaligned-stimulus control, the chosen layer was refitted on its features
circularly shifted in time within each story (with a test story), or the whole nested procedure
was repeated on each story's stimulus rotated in time by 20-80% of its length (without one).
Voxelwise p-values came from circular shifts of the prediction against the test response, or,
without a test story, from each voxel's r divided by its spread over circular shifts of its
prediction, compared with the same statistic of the misaligned-stimulus fits pooled over voxels
and draws; they were corrected by the Benjamini-Hochberg false discovery rate. Feature spaces were combined by
stacked regression with convex per-voxel weights (Lin et al. 2024). The exact settings of this
run are in its config.toml.

## References

{_REFERENCES}"""


_README = """\
# bidsenc outputs

A BIDS-Derivatives dataset written by bidsenc. Per participant, `sub-<label>/func/` holds
statistical maps of each feature model's best layer (`*_stat-<r|r2|ccnorm|alpha|cvscore|logp|fdr>_statmap.*`,
each with a JSON sidecar; without a repeated test story, the model's nested held-out scores and its
`logp` and `fdr` maps are `desc-<model>_stat-*` with no layer), the noise ceiling (`desc-ceiling_stat-ccmax`), stacking maps
(`desc-stacked*`), one array file per feature model with every layer's statistics
(`*_desc-<model>_encoding.npz`), and tables (`*_desc-models_summary.tsv`,
`*_desc-datascaling_summary.tsv`). `sub-<label>.html` is the participant's report,
`group.html` and `group/` the group-level scaling report, `logs/` the settings, logs and
citation boilerplate of every run.
"""

__all__ = ["BIDSIGNORE", "citation_text", "dataset_description", "existing_version", "write_dataset_files"]
