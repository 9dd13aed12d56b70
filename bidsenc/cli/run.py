"""``bidsenc bids_dir output_dir {participant,group}``: parse, configure, dispatch.

Errors the user can fix end with one line and their exit code (see
:mod:`bidsenc.errors`); anything else writes a crash file under ``logs/`` and
exits 1.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from .. import __version__
from .._io import atomic_write_text
from ..config import FeatureSpec, RunConfig, build_config, parse_key_path
from ..errors import BidsencError, IOFailure, OutputError, UsageError, broken_package
from .parser import build_parser

log = logging.getLogger("bidsenc")

_IO_ERRNOS = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_SECTIONS = {
    "execution": {"work_dir", "feature_cache", "bids_database_dir", "nprocs", "omp_nthreads", "device",
                  "random_seed", "verbose", "allow_download", "features_only", "model_dir", "reports_only", "force"},
    "models": {"preset", "test_stories", "cv_score", "bootstraps", "bootstrap_chunk_len", "bootstrap_chunks",
               "ceiling_floor", "high_pass", "null_draws", "n_permutations", "data_scaling_seeds", "confounds",
               "save_weights", "banded"},
    "outputs": {"map_layers", "atlas", "atlas_labels", "ceiling_threshold", "reports"},
}


def main(argv: list[str] | None = None) -> int:
    """Run bidsenc; return the exit code."""
    try:
        return _main(argv)
    finally:  # called from Python (tests, notebooks): the next call logs to its own files and stderr
        root = logging.getLogger("bidsenc")
        for handler in _HANDLERS:
            root.removeHandler(handler)
            handler.close()
        _HANDLERS.clear()
        root.propagate = True


def _main(argv: list[str] | None) -> int:
    logs_dir = None
    # SLURM and container runtimes stop jobs with SIGTERM: unwind normally so that
    # feature-cache locks are released and no half-written output is left behind.
    signal.signal(signal.SIGTERM, _terminate)
    _writable_config_dirs()
    try:
        cfg = configure(argv)
        logs_dir, run_id = _prepare_outputs(cfg)
        _setup_logging(cfg, logs_dir / run_id / "bidsenc.log")
        log.info("bidsenc %s, run %s", __version__, run_id)
        atomic_write_text(logs_dir / run_id / "config.toml", cfg.to_toml())
        _run(cfg, logs_dir, logs_dir / run_id)
        return 0
    except BidsencError as err:
        return _fail(err)
    except OSError as err:
        if err.errno in _IO_ERRNOS:
            return _fail(IOFailure(f"I/O error on {err.filename or 'a file'}: {err.strerror}; "
                                   "check free space and quotas, then rerun"))
        broken = broken_package(err)  # e.g. a compiled library that does not load
        return _fail(broken) if broken else _crash(logs_dir)
    except KeyboardInterrupt:
        print("bidsenc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        broken = broken_package(err)
        return _fail(broken) if broken else _crash(logs_dir)


def _writable_config_dirs() -> None:
    """With a read-only home (clusters, containers run as another user), point matplotlib at a
    private temporary folder, as the container image does, instead of letting it warn."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    existing = next((p for p in (config / "matplotlib", config, config.parent) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        import tempfile

        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="bidsenc-matplotlib-")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def configure(argv: list[str] | None) -> RunConfig:
    """Parse ``argv`` and build the run's configuration (no side effects)."""
    ns = vars(build_parser().parse_args(argv))
    config_file = ns.pop("config_file", None)
    cli: dict = {"inputs": {}, "execution": {}}
    if "mem" in ns:
        cli["execution"]["mem_gb"] = ns.pop("mem")
    if "features" in ns:
        cli["features"] = [FeatureSpec.parse(s) for s in ns.pop("features")]
    if "derivatives" in ns:
        ns["derivatives"] = parse_key_path(ns["derivatives"], "--derivatives")
    if "word_timings" in ns:
        ns["word_timings"] = parse_key_path(ns["word_timings"], "--word-timing")
    if "bids_filter_file" in ns:
        ns["bids_filters"] = _read_filter_file(ns.pop("bids_filter_file"))
    cli["models"], cli["outputs"] = {}, {}
    for key, value in ns.items():
        section = next((name for name, keys in _SECTIONS.items() if key in keys), "inputs")
        cli[section][key] = value
    return build_config(cli, config_file)


def _read_filter_file(path: Path) -> dict:
    try:
        filters = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--bids-filter-file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {err}") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"--bids-filter-file {path}: expected {{\"bold\": {{\"session\": \"1\", ...}}}}")
    return filters


def _prepare_outputs(cfg: RunConfig) -> tuple[Path, str]:
    logs_dir = cfg.inputs.output_dir / "logs"
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"_{os.getpid()}"
    try:
        (logs_dir / run_id).mkdir(parents=True, exist_ok=True)
        cfg.execution.work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {err.filename}: {err.strerror}; choose an output_dir and "
                          "work dir you can write to") from None
    for option, folder in (("--feature-cache", cfg.feature_cache),
                           ("--bids-database-dir", cfg.execution.bids_database_dir)):
        problem = _folder_problem(folder) if folder is not None and cfg.inputs.analysis_level == "participant" \
            else None
        if problem:
            raise OutputError(f"{option}: {problem}; give {option} a folder you can write to")
    return logs_dir, run_id


def _setup_logging(cfg: RunConfig, logfile: Path) -> None:
    level = logging.DEBUG if cfg.execution.verbose else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%H:%M:%S"))
    to_file = logging.FileHandler(logfile)
    to_file.setFormatter(fmt)
    root = logging.getLogger("bidsenc")
    for old in _HANDLERS:
        root.removeHandler(old)
        old.close()
    _HANDLERS[:] = [console, to_file]
    for handler in _HANDLERS:
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


# The handlers main() installed: errors before they exist go to stderr as plain lines.
_HANDLERS: list[logging.Handler] = []


def _run(cfg: RunConfig, logs_dir: Path, run_dir: Path) -> None:
    from .. import workflow
    from ..bids.discover import open_dataset, select_participants
    from ..bids.validate import validate_bids

    if cfg.inputs.analysis_level == "group":
        workflow.group(cfg)
        return
    from ..device import resolve_device

    _limit_threads(cfg)
    if cfg.execution.reports_only:
        workflow.reports_only(cfg, logs_dir)
        return
    device = resolve_device(cfg.execution.device)
    if not cfg.inputs.skip_bids_validation:
        validate_bids(cfg.inputs.bids_dir)
    dataset = open_dataset(cfg)
    labels = select_participants(dataset, cfg)
    _check_writable(cfg, labels)
    if cfg.execution.features_only:
        workflow.features_only(cfg, dataset, labels, logs_dir, run_dir, device)
        return
    workflow.each_participant(labels, lambda label: workflow.participant(cfg, dataset, label, logs_dir, run_dir,
                                                                        device))


def _check_writable(cfg: RunConfig, labels: list[str]) -> None:
    """Output folders that cannot be written (a file in the way, permissions): found now, not after the fit."""
    out = cfg.inputs.output_dir
    for label in labels:
        folder = out / f"sub-{label}"
        for path in (folder, *folder.glob("ses-*"), *folder.glob("**/func")):
            problem = _folder_problem(path)
            if problem:
                raise OutputError(f"{problem}; move it away or choose another output_dir")


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder bidsenc writes into; None when it can.

    The path itself or the first of its parents that exists must be a folder that can be
    written to: a file in the way, or a read-only folder, is named.
    """
    for existing in (path, *path.parents):
        if existing.exists():
            break
    else:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder" + ("" if existing == path else f", so {path} cannot be made in it")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} exists but cannot be written to (permissions or a read-only mount)"
    return None


def _limit_threads(cfg: RunConfig) -> None:
    """--omp-nthreads (else --nprocs) caps torch's and the BLAS libraries' threads, for shared nodes."""
    n = cfg.execution.omp_nthreads or cfg.execution.nprocs
    if not n:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


def _fail(err: BidsencError) -> int:
    if _HANDLERS:
        log.error(err.message)
    else:
        print(f"bidsenc: error: {err.message}", file=sys.stderr)
    return err.exit_code


def _crash(logs_dir: Path | None) -> int:
    text = traceback.format_exc()
    target = None
    for folder in (logs_dir, Path.cwd()):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.txt"
            target.write_text(f"bidsenc {__version__}\n{' '.join(sys.argv)}\n\n{text}")
            break
        except OSError:
            target = None
    where = str(target) if target else "(could not be written)"
    msg = f"internal error: {text.strip().splitlines()[-1]}; details in {where} (please report it)"
    if _HANDLERS:
        log.error(msg)
    else:
        print(f"bidsenc: error: {msg}", file=sys.stderr)
    return 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
