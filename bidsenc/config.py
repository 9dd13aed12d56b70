"""The run's settings: one typed object, built from defaults, a TOML file and the CLI.

Precedence is defaults < ``--config-file`` < command line. The resolved object is
written to ``output_dir/logs/config.toml`` in the same layout that
``--config-file`` reads, so a run can be repeated from its own record.
No other module reads argv or environment variables for run parameters.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

from .errors import UsageError

ANALYSIS_LEVELS = ("participant", "group")
DEVICES = ("auto", "cpu", "cuda")
FEATURE_KINDS = ("lm", "audio", "lowlevel")
DEFAULT_FEATURES = ("lm:facebook/opt-125m", "audio:openai/whisper-tiny")
#: The field's high-pass convention (SPM, FSL, fMRIPrep's cosine regressors): a 128 s period.
DEFAULT_HIGH_PASS = 1 / 128


@dataclass(frozen=True)
class FeatureSpec:
    """One feature space: a model and how to extract its features.

    ``kind`` is ``"lm"`` (text, needs word timings) or ``"audio"`` (needs audio).
    ``options`` holds extraction settings (layers, dtype, batch size, context).
    """

    kind: str
    model: str
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> FeatureSpec:
        """Parse ``KIND:MODEL[:KEY=VALUE...]``, e.g. ``lm:facebook/opt-125m:layers=all``."""
        kind, _, rest = spec.partition(":")
        parts = rest.split(":")
        model, opts = parts[0], parts[1:]
        if kind not in FEATURE_KINDS or not model:
            raise UsageError(
                f"--feature {spec!r}: expected KIND:MODEL[:KEY=VALUE...] with KIND one of "
                f"{', '.join(FEATURE_KINDS)}, e.g. lm:facebook/opt-125m:layers=all"
            )
        options = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or not key:
                raise UsageError(f"--feature {spec!r}: option {opt!r} is not KEY=VALUE")
            options[key] = value
        return cls(kind, model, options)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        d = dict(d)
        try:
            kind, model = d.pop("kind"), d.pop("model")
        except KeyError as err:
            raise UsageError(f"config [[features]] entry {d!r} lacks {err.args[0]!r}") from None
        if kind not in FEATURE_KINDS:
            raise UsageError(f"config [[features]] kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
        return cls(kind, str(model), d)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model, **self.options}


@dataclass(frozen=True)
class InputConfig:
    """What to read."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    bids_filters: dict = field(default_factory=dict)
    derivatives: dict = field(default_factory=dict)
    space: str | None = None
    stimuli_dir: Path | None = None
    word_timings: dict = field(default_factory=dict)
    #: A NIfTI mask on the BOLD grid choosing the voxels to fit (default: the runs' own brain mask,
    #: else one computed from the EPI, else every finite voxel of a small image).
    mask: Path | None = None
    skip_bids_validation: bool = False


@dataclass(frozen=True)
class ExecutionConfig:
    """How and where to compute."""

    work_dir: Path = Path("work")
    feature_cache: Path | None = None
    bids_database_dir: Path | None = None
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    device: str = "auto"
    random_seed: int = 0
    verbose: int = 0
    allow_download: bool = False
    #: Local copies of hub models, looked up as ``<model_dir>/<org>/<name>`` before the hub
    #: cache (the container's baked models; default: $BIDSENC_MODEL_DIR when set).
    model_dir: Path | None = None
    #: Only rewrite the HTML reports from the outputs already in output_dir.
    reports_only: bool = False
    features_only: bool = False
    #: Recompute participants whose outputs are complete (by default they are skipped).
    force: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """How responses and features are aligned and the encoding models fitted and scored."""

    #: "default" (delays/trims in seconds, within runs, story-wise CV) or "reference"
    #: (Antonello et al. 2023: delays across stories, TR trims, bootstrap chunks, alpha grid).
    preset: str = "default"
    #: Stories for the test set (default: those heard more than once).
    test_stories: tuple[str, ...] = ()
    n_folds: int = 5
    #: Alpha grid: "default" (logspace(0, 10, 21) in himalaya's convention) or "reference".
    alphas: str = "default"
    #: Validation score that chooses each voxel's alpha: "r2", "r", or "reference" (the reference
    #: code's bootstrap_ridge(use_corr=False) score); None: "reference" under the reference preset,
    #: else "r2".
    cv_score: str | None = None
    #: Floor applied to CC_max; none by default, and none under the reference preset either (its
    #: callers pass 0.25, but the line of its function that would apply a floor is commented out).
    ceiling_floor: float | None = None
    #: The reference preset's alpha selection (the reference's bootstrap_ridge): this many splits,
    #: each holding out ``bootstrap_chunks`` random chunks of ``bootstrap_chunk_len`` consecutive
    #: training volumes (None: 20% of the chunks). Defaults: the ds003020 encoding script's 50 and 40.
    bootstraps: int = 50
    bootstrap_chunk_len: int = 40
    bootstrap_chunks: int | None = None
    #: With a test story, significance by circular shifts of the prediction against the test response
    #: (without one, by the misaligned-stimulus null; by circular shifts only when that is off).
    n_permutations: int = 1000
    fdr_q: float = 0.05
    #: Misaligned-stimulus null, this many draws: with a test story the chosen layer refitted on its
    #: features circularly shifted per story; without one the whole nested procedure on each story's
    #: stimulus rotated in time. 0 turns it off.
    null_draws: int = 5
    #: Response cleaning: "auto" (detrend fMRIPrep and raw data; not ds003020's cleaned files),
    #: "detrend" or "none".
    clean: str = "auto"
    #: Cosine high-pass cutoff in Hz, applied per run to the responses and the delayed features
    #: alike; None: :data:`DEFAULT_HIGH_PASS` where the responses are cleaned here (raw and fMRIPrep
    #: inputs) under the default preset, none for ds003020's cleaned files and the reference preset;
    #: 0: none.
    high_pass: float | None = None
    #: fMRIPrep confounds regressed out of each run, by column name or shell pattern
    #: (e.g. "trans_?", "rot_?", "a_comp_cor_0[0-4]"; "trans_*" adds derivatives and squares); none by default.
    confounds: tuple[str, ...] = ()
    lanczos_normalize: bool = False
    #: Stack the best layer of every feature space (needs two spaces or more).
    stacking: bool = True
    #: Data scaling: random subsets of 1, 2, 4, ... training stories, this many seeds per
    #: size (0 turns it off); each model's best layer, same test set, alphas re-chosen.
    data_scaling_seeds: int = 3
    #: Without test repeats, other participants (at most this many) who heard the same runs
    #: in the same template space give an inter-subject ceiling; 0 turns it off.
    intersubject_peers: int = 10
    #: Also fit the best layers of all feature spaces jointly by banded ridge (himalaya).
    banded: bool = False
    #: Keep the best layer's ridge weights in each model's array file (large: features x delays x voxels).
    save_weights: bool = False


@dataclass(frozen=True)
class OutputConfig:
    """What is written: maps, reports, and the group level's regions and thresholds."""

    #: Layers written as maps besides the best one: "best", "all", or a list such as "0,4-6".
    map_layers: str = "best"
    #: Voxels whose noise ceiling (CC_max) is at least this count as "well-predictable".
    ceiling_threshold: float = 0.3
    #: An atlas of labelled regions (NIfTI, or GIfTI label files per hemisphere) in the
    #: participants' space, and a TSV naming its labels (``index``, ``name``).
    atlas: tuple[Path, ...] = ()
    atlas_labels: Path | None = None
    #: Write the HTML reports.
    reports: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Every parameter of a run."""

    inputs: InputConfig
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    features: tuple[FeatureSpec, ...] = tuple(FeatureSpec.parse(s) for s in DEFAULT_FEATURES)

    @property
    def default_features(self) -> bool:
        """Whether the feature spaces are bidsenc's defaults (none was asked for)."""
        return self.features == tuple(FeatureSpec.parse(s) for s in DEFAULT_FEATURES)

    @property
    def needs_words(self) -> bool:
        return any(f.kind == "lm" or (f.kind == "lowlevel" and f.model != "envelope") for f in self.features)

    @property
    def needs_audio(self) -> bool:
        return any(f.kind == "audio" or (f.kind == "lowlevel" and f.model == "envelope") for f in self.features)

    @property
    def feature_cache(self) -> Path:
        return self.execution.feature_cache or self.execution.work_dir / "feature-cache"

    def to_toml(self) -> str:
        return tomli_w.dumps(_plain(
            {
                "inputs": asdict(self.inputs),
                "execution": asdict(self.execution),
                "models": asdict(self.models),
                "outputs": asdict(self.outputs),
                "features": [f.to_dict() for f in self.features],
            }
        ))


    def results_fingerprint(self) -> str:
        """A digest of every setting a participant's outputs depend on.

        Where and how fast things run (work folder, threads, device, logging, which
        participants this job takes, reports) is left out; everything else, the input
        paths included, is in: outputs written with another fingerprint are recomputed.
        """
        import hashlib

        inputs = {k: v for k, v in asdict(self.inputs).items()
                  if k not in ("output_dir", "analysis_level", "participant_label", "skip_bids_validation")}
        outputs = {k: v for k, v in asdict(self.outputs).items() if k != "reports"}
        text = tomli_w.dumps(_plain({"inputs": inputs, "models": asdict(self.models), "outputs": outputs,
                                     "features": [f.to_dict() for f in self.features],
                                     "random_seed": self.execution.random_seed}))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- building

_SECTIONS = ("inputs", "execution", "models", "outputs")
_PATH_KEYS = {"bids_dir", "output_dir", "stimuli_dir", "mask", "work_dir", "feature_cache", "bids_database_dir",
              "atlas_labels", "model_dir"}


def build_config(cli: dict, config_file: Path | None = None) -> RunConfig:
    """Merge defaults, a TOML file and command-line values into a validated RunConfig.

    Parameters
    ----------
    cli : dict
        ``{section: {key: value}}`` of the options given on the command line only.
    config_file : Path, optional
        A TOML file with ``[inputs]``, ``[execution]`` and ``[[features]]``.
    """
    merged: dict = {section: {} for section in _SECTIONS}
    features = None
    if config_file is not None:
        file_values = read_toml(config_file)
        unknown = set(file_values) - {*_SECTIONS, "features"}
        if unknown:
            raise UsageError(
                f"{config_file}: unknown section(s) {', '.join(sorted(unknown))}; "
                "expected [inputs], [execution], [models], [outputs] and [[features]]"
            )
        for section in _SECTIONS:
            table = file_values.get(section, {})
            if not isinstance(table, dict):
                raise UsageError(f"{config_file}: {section} must be a table, [{section}]")
            merged[section].update(table)
        if "features" in file_values:
            entries = file_values["features"]
            if not isinstance(entries, list) or not all(isinstance(d, dict) for d in entries):
                raise UsageError(f"{config_file}: write each feature space as an array entry [[features]] "
                                 "(double brackets) with kind and model, e.g. kind = \"lm\"")
            features = tuple(FeatureSpec.from_dict(d) for d in entries)
    if config_file is not None:
        _check_file_values(merged, cli, features, config_file)
    for section in _SECTIONS:
        merged[section].update(cli.get(section, {}))
    merged["execution"].setdefault("work_dir", "work")  # relative to where bidsenc was started
    if os.environ.get("BIDSENC_MODEL_DIR"):  # set by the container image, which bakes the default models
        merged["execution"].setdefault("model_dir", os.environ["BIDSENC_MODEL_DIR"])
    if cli.get("features"):
        features = tuple(cli["features"])

    inputs = _make(InputConfig, merged["inputs"], "inputs")
    execution = _make(ExecutionConfig, merged["execution"], "execution")
    models = _make(ModelConfig, merged["models"], "models")
    outputs = _make(OutputConfig, merged["outputs"], "outputs")
    cfg = (RunConfig(inputs, execution, models, outputs) if features is None
           else RunConfig(inputs, execution, models, outputs, features))
    _validate(cfg)
    return cfg


def _check_file_values(from_file: dict, cli: dict, features, config_file: Path) -> None:
    """Type-check every value of the config file, also those the command line overrides.

    A bad value in a file that is reused later must not go unnoticed because this run's
    command line happened to override it.
    """
    given = {key: cli.get("inputs", {}).get(key) for key in ("bids_dir", "output_dir", "analysis_level")}
    try:
        cfg = RunConfig(_make(InputConfig, {**from_file["inputs"], **given}, "inputs"),
                        _make(ExecutionConfig, from_file["execution"], "execution"),
                        _make(ModelConfig, from_file["models"], "models"),
                        _make(OutputConfig, from_file["outputs"], "outputs"),
                        *(() if features is None else (features,)))
        _check_types(cfg)
    except UsageError as err:
        raise UsageError(err.message if str(config_file) in err.message else f"{config_file}: {err.message}") from None


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None


def parse_participant_labels(values) -> tuple[str, ...]:
    """Labels with or without ``sub-``; a value naming an existing file is read as a list of labels."""
    labels: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            labels.extend(path.read_text().split())
        else:
            labels.append(value)
    return tuple(dict.fromkeys(lab.strip().removeprefix("sub-") for lab in labels if lab.strip()))


def parse_mem_gb(value: str | float | int | None) -> float | None:
    """``16GB``, ``16G``, ``16000MB``, ``500``(MB, as fMRIPrep reads a bare number)."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not m:
        raise UsageError(f"--mem {value!r}: expected a size such as 16GB or 8000MB")
    scale = {"k": 1e-6, "m": 1e-3, "": 1e-3, "g": 1.0, "t": 1e3}[m.group(2)]
    return float(m.group(1)) * scale


def parse_key_path(values, option: str) -> dict:
    """``NAME=PATH`` pairs (``-d fmriprep=/path``, ``--word-timing STIM=FILE``)."""
    out = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"{option} {value!r}: expected NAME=PATH")
        out[name] = path
    return out


def _make(cls, values: dict, section: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise UsageError(
            f"unknown [{section}] setting(s): {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in values.items():
        if key in _PATH_KEYS and value is not None:
            value = Path(value).expanduser().absolute()
        elif key in ("participant_label",):
            value = parse_participant_labels([value] if isinstance(value, str) else value)
        elif key in ("session_label", "task", "test_stories", "confounds"):
            value = tuple([value] if isinstance(value, str) else value)
        elif key == "atlas":
            value = tuple(Path(v).expanduser().absolute() for v in ([value] if isinstance(value, str) else value))
        elif key == "mem_gb":
            value = parse_mem_gb(value)
        elif key in ("derivatives", "word_timings"):
            value = {k: str(Path(v).expanduser().absolute()) for k, v in dict(value).items()}
        kwargs[key] = value
    missing = [f.name for f in known.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise UsageError(f"missing required setting(s): {', '.join(missing)}")
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    _check_types(cfg)
    inp, exe = cfg.inputs, cfg.execution
    if inp.analysis_level not in ANALYSIS_LEVELS:
        from .errors import AnalysisLevelError

        raise AnalysisLevelError(
            f"unknown analysis level {inp.analysis_level!r}; choose one of {', '.join(ANALYSIS_LEVELS)}"
        )
    if exe.device not in DEVICES:
        raise UsageError(f"--device {exe.device!r}: choose one of {', '.join(DEVICES)}")
    for key in ("nprocs", "omp_nthreads"):
        value = getattr(exe, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"--{key} must be a positive integer, got {value!r}")
    if not isinstance(exe.random_seed, int):
        raise UsageError(f"--random-seed must be an integer, got {exe.random_seed!r}")
    if not inp.bids_dir.is_dir():
        raise UsageError(f"bids_dir {inp.bids_dir} does not exist or is not a folder")
    bids = inp.bids_dir.resolve()
    out = inp.output_dir.resolve()
    if out == bids:
        raise UsageError(
            "output_dir is the same folder as bids_dir; write outputs elsewhere, "
            "e.g. <bids_dir>/derivatives/bidsenc"
        )
    if out.is_relative_to(bids) and not out.is_relative_to(bids / "derivatives"):
        raise UsageError(
            f"output_dir {inp.output_dir} is inside bids_dir's raw data; use "
            f"{bids / 'derivatives' / 'bidsenc'} or a folder outside bids_dir"
        )
    if exe.work_dir.resolve().is_relative_to(bids):
        raise UsageError(f"work dir {exe.work_dir} is inside bids_dir; put it outside the dataset")
    if inp.mask is not None and not inp.mask.is_file():
        raise UsageError(f"--mask {inp.mask} does not exist or is not a file")
    if inp.stimuli_dir is not None and not inp.stimuli_dir.is_dir():
        raise UsageError(f"--stimuli-dir {inp.stimuli_dir} does not exist or is not a folder")
    for name, path in inp.derivatives.items():
        if not Path(path).is_dir():
            raise UsageError(f"--derivatives {name}={path}: folder does not exist")
    if not cfg.features:
        raise UsageError("no feature spaces configured; give at least one --feature")
    m = cfg.models
    if m.preset not in ("default", "reference"):
        raise UsageError(f"--preset {m.preset!r}: choose default or reference")
    if m.alphas not in ("default", "reference"):
        raise UsageError(f"alphas {m.alphas!r}: choose default or reference")
    if m.clean not in ("auto", "detrend", "none"):
        raise UsageError(f"clean {m.clean!r}: choose auto, detrend or none")
    if m.cv_score not in (None, "r", "r2", "reference"):
        raise UsageError(f"cv_score {m.cv_score!r}: choose r, r2 or reference")
    if m.high_pass is not None and (isinstance(m.high_pass, bool) or not isinstance(m.high_pass, int | float)
                                    or not 0 <= m.high_pass < 0.1):
        raise UsageError(f"high_pass {m.high_pass!r}: a cutoff in Hz from 0 (none) to below 0.1, e.g. 1/128 = 0.0078")
    if m.n_folds < 2:
        raise UsageError(f"n_folds must be an integer of at least 2, got {m.n_folds!r}")
    if not 0 <= m.null_draws <= 1000:
        raise UsageError(f"null_draws must be a whole number from 0 (off) to 1000, got {m.null_draws!r}")
    if m.data_scaling_seeds < 0:
        raise UsageError(f"data_scaling_seeds must be a whole number, got {m.data_scaling_seeds!r}")
    if m.n_permutations < 1:
        raise UsageError(f"n_permutations must be a positive whole number (e.g. 1000), got {m.n_permutations!r}")
    if not 0 < m.fdr_q < 1:
        raise UsageError(f"fdr_q must lie strictly between 0 and 1 (e.g. 0.05), got {m.fdr_q!r}")
    if exe.mem_gb is not None and not exe.mem_gb > 0:
        raise UsageError(f"--mem {exe.mem_gb!r} GB: give a positive size such as 16GB")
    if not 0 <= cfg.outputs.ceiling_threshold <= 1:
        raise UsageError(f"ceiling_threshold must lie between 0 and 1 (a CC_max), got "
                         f"{cfg.outputs.ceiling_threshold!r}")
    if m.ceiling_floor is not None and not 0 <= m.ceiling_floor <= 1:
        raise UsageError(f"ceiling_floor must lie between 0 and 1, got {m.ceiling_floor!r}")
    for key in ("bootstraps", "bootstrap_chunk_len"):
        if getattr(m, key) < 1:
            raise UsageError(f"{key} must be a positive integer, got {getattr(m, key)!r}")
    if m.bootstrap_chunks is not None and m.bootstrap_chunks < 1:
        raise UsageError(f"bootstrap_chunks must be a positive integer, got {m.bootstrap_chunks!r}")
    o = cfg.outputs
    if o.map_layers not in ("best", "all") and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", o.map_layers):
        raise UsageError(f"--map-layers {o.map_layers!r}: expected best, all, or layers such as 0,4-6")
    for path in (*o.atlas, o.atlas_labels):
        if path is not None and not path.is_file():
            raise UsageError(f"atlas file {path} does not exist")
    if o.atlas and o.atlas_labels is None:
        raise UsageError("--atlas needs --atlas-labels, a TSV with the columns index and name")


def _check_types(cfg: RunConfig) -> None:
    """Every setting has its declared type (a TOML file can hold anything): one line naming it."""
    for section in (cfg.inputs, cfg.execution, cfg.models, cfg.outputs):
        hints = typing.get_type_hints(type(section))
        for f in fields(section):
            value = getattr(section, f.name)
            if not _has_type(value, hints[f.name]):
                name = f"[{_SECTION_OF[type(section).__name__]}] {f.name}"
                raise UsageError(f"setting {name} = {value!r}: expected {_describe(hints[f.name])}")


_SECTION_OF = {"InputConfig": "inputs", "ExecutionConfig": "execution", "ModelConfig": "models",
               "OutputConfig": "outputs"}


def _has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return "a list of " + {str: "strings", Path: "paths", int: "whole numbers"}.get(args[0], str(args[0]))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path", dict: "a table"}.get(origin or hint, str(hint))


def _plain(obj):
    """Make a structure TOML-serialisable: paths to str, tuples to lists, drop None."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
