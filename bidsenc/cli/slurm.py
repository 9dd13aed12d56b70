"""``bidsenc-slurm BIDS_DIR OUTPUT_DIR [options]``: the whole analysis as three SLURM jobs.

One features job (``participant --features-only``), then an array of participant jobs
(one task per participant, after the features job succeeded), then the group job (after
every task ended, whatever its outcome, so the group report names the failed ones).
The batch scripts are written to ``OUTPUT_DIR/logs/slurm/`` and submitted with
``sbatch --parsable``; the last line printed is ``features=<id> participants=<id> group=<id>``.

Every option that is not bidsenc-slurm's own is passed to bidsenc unchanged, after
bidsenc's own parser has accepted it (a typo fails here, with exit code 64, not in a job).
Exit codes are bidsenc's (:mod:`bidsenc.errors`), plus 69 (EX_UNAVAILABLE) when ``sbatch``
is not installed; ``sbatch`` refusing a job (e.g. the controller is down, a bad partition)
ends with 75, a temporary failure.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BidsencError, OutputError, TemporaryFailure, UsageError

#: sysexits' EX_UNAVAILABLE: the scheduler's commands are not installed here.
EXIT_NO_SLURM = 69

_LABEL_OPTIONS = ("--participant-label", "--participant_label")
_CONTAINER_KINDS = ("docker", "singularity", "apptainer")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64, like bidsenc's."""

    def error(self, message):
        raise UsageError(f"{message} (see bidsenc-slurm --help)")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of bidsenc-slurm's own options (bidsenc's are passed through).

    Returns
    -------
    argparse.ArgumentParser
        A parser without positional arguments: BIDS_DIR and OUTPUT_DIR are taken from what
        it leaves, and everything else it leaves goes to bidsenc.
    """
    parser = _Parser(
        prog="bidsenc-slurm",
        usage="bidsenc-slurm BIDS_DIR OUTPUT_DIR [bidsenc-slurm options] [bidsenc options]",
        description="Submit bidsenc to SLURM: one features job, an array of participant jobs after it, "
        "and the group job after them. Options not listed here are bidsenc's (see bidsenc --help) and go "
        "to every job unchanged. Scheduler options that start with '-' are given with '=', e.g. "
        "--sbatch-option=--time=4:00:00, or without the dashes: --sbatch-option time=4:00:00.",
        # bidsenc's abbreviations (e.g. --part) must not be taken for ours
        allow_abbrev=False,
    )
    parser.add_argument("--sbatch-option", dest="sbatch_all", action="append", default=[], metavar="ARG",
                        help="an sbatch option for all three jobs (partition, time, memory, account), "
                        "repeatable; written as an #SBATCH line")
    parser.add_argument("--features-sbatch-option", dest="sbatch_features", action="append", default=[],
                        metavar="ARG", help="an sbatch option for the features job only, e.g. gres=gpu:1")
    parser.add_argument("--participants-sbatch-option", dest="sbatch_participants", action="append",
                        default=[], metavar="ARG", help="an sbatch option for each participant job only")
    parser.add_argument("--group-sbatch-option", dest="sbatch_group", action="append", default=[],
                        metavar="ARG", help="an sbatch option for the group job only")
    parser.add_argument("--throttle", type=int, metavar="K",
                        help="run at most K participant jobs at once (--array 1-N%%K)")
    parser.add_argument("--container", nargs=2, metavar=("RUNTIME", "IMAGE"),
                        help="run bidsenc in a container: docker IMAGE, or singularity/apptainer IMAGE.sif "
                        "(default: the bidsenc installed beside this command)")
    parser.add_argument("--container-option", action="append", default=[], metavar="ARG",
                        help="an extra option for the container runtime, e.g. --container-option=--bind=/models "
                        "(repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the batch scripts to OUTPUT_DIR/logs/slurm/ and submit nothing")
    return parser


@dataclass
class _Plan:
    """What to submit: the bidsenc options and where things are."""

    bids_dir: Path
    output_dir: Path
    options: list[str]
    labels: list[str]
    cwd: Path
    binds: list[tuple[Path, bool]] = field(default_factory=list)  # (folder, read-only)


def main(argv: list[str] | None = None) -> int:
    """Run bidsenc-slurm; return the exit code."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except BidsencError as err:
        print(f"bidsenc-slurm: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except _NoSlurm as err:
        print(f"bidsenc-slurm: error: {err}", file=sys.stderr)
        return EXIT_NO_SLURM
    except KeyboardInterrupt:
        print("bidsenc-slurm: interrupted", file=sys.stderr)
        return 130


class _NoSlurm(Exception):
    """sbatch is not installed (exit 69)."""


def _main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    ns, rest = build_parser().parse_known_args(argv)
    if ns.throttle is not None and ns.throttle < 1:
        raise UsageError("--throttle must be at least 1")
    if ns.container and ns.container[0] not in _CONTAINER_KINDS:
        raise UsageError(f"--container {ns.container[0]!r}: expected one of {', '.join(_CONTAINER_KINDS)}")
    plan = _plan(rest)
    folder = plan.output_dir / "logs" / "slurm"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        scripts = _write_scripts(folder, plan, ns)
    except OSError as err:
        raise OutputError(f"cannot write the batch scripts in {folder}: {err.strerror}; choose an "
                          "OUTPUT_DIR you can write to") from None
    if ns.dry_run:
        print(f"wrote {', '.join(p.name for p in scripts.values())} and participants.txt to {folder}; "
              f"submit them with: {_submit_commands(scripts)}")
        return 0
    submitted: list[str] = []
    try:
        submitted.append(_sbatch([str(scripts["features"])]))
        submitted.append(_sbatch([f"--dependency=afterok:{submitted[0]}", str(scripts["participants"])]))
        submitted.append(_sbatch([f"--dependency=afterany:{submitted[1]}", str(scripts["group"])]))
    except TemporaryFailure:
        if submitted:  # no half submission left waiting in the queue
            subprocess.run([shutil.which("scancel") or "scancel", *submitted], capture_output=True, check=False)
            print(f"bidsenc-slurm: cancelled job(s) {' '.join(submitted)}", file=sys.stderr)
        raise
    features, participants, group = submitted
    print(f"{len(plan.labels)} participant(s): {' '.join(plan.labels)}; logs in {folder}")
    print(f"features={features} participants={participants} group={group}")
    return 0


def _plan(rest: list[str]) -> _Plan:
    """Split what our parser left into BIDS_DIR, OUTPUT_DIR and bidsenc's options, check them with
    bidsenc's parser and configuration, and find the participants as the participant level does."""
    from ..bids.discover import open_dataset, select_participants
    from .parser import build_parser as bidsenc_parser
    from .run import configure

    # The positionals come first, as in bidsenc's usage line: an option's values and a
    # positional cannot be told apart without bidsenc's parser deciding for us.
    if len(rest) < 2 or rest[0].startswith("-") or rest[1].startswith("-"):
        raise UsageError("give BIDS_DIR and OUTPUT_DIR first, then the options (see bidsenc-slurm --help)")
    bids_dir, output_dir = Path(rest[0]).absolute(), Path(rest[1]).absolute()
    for path in (bids_dir, output_dir, Path.cwd()):
        if any(c in str(path) for c in '"\n'):  # #SBATCH lines quote paths with double quotes
            raise UsageError(f"{str(path)!r} holds a double quote or a line break, which batch scripts cannot "
                             "quote; use a folder without them")
    parser = bidsenc_parser()
    options = _full_option_names(rest[2:], parser)
    if any(o == "--features-only" or o == "--reports-only" for o in options):
        raise UsageError("--features-only/--reports-only: bidsenc-slurm runs the features job itself; "
                         "run bidsenc directly for those")
    argv = [str(bids_dir), str(output_dir), "participant", *options]
    parser.parse_args(argv)  # bidsenc's own message and exit code 64 for a typo
    cfg = configure(argv)
    labels = select_participants(open_dataset(cfg), cfg)
    plan = _Plan(bids_dir, output_dir, options, labels, Path.cwd())
    plan.binds = _binds(cfg, plan)
    return plan


def _binds(cfg, plan: _Plan) -> list[tuple[Path, bool]]:
    """Folders a container must see, at the same paths as on the host, so that every path on
    the command line and in the config file means the same inside."""
    wanted: list[tuple[Path, bool]] = [(plan.bids_dir, True), (plan.output_dir, False), (plan.cwd, False),
                                       (cfg.execution.work_dir, False), (cfg.feature_cache, False)]
    inputs, exe = cfg.inputs, cfg.execution
    for path in (inputs.stimuli_dir, exe.bids_database_dir, exe.model_dir, *inputs.derivatives.values()):
        if path is not None:
            wanted.append((Path(path), path == exe.bids_database_dir))
    files = [inputs.mask, *(cfg.outputs.atlas or ()), cfg.outputs.atlas_labels, *inputs.word_timings.values()]
    config_file = _option_value(plan.options, "--config-file")
    files.append(Path(config_file) if config_file else None)
    wanted += [(Path(f).parent, True) for f in files if f is not None]
    access: dict[Path, bool] = {}
    for path, read_only in wanted:  # a folder wanted both ways is bound writable
        path = Path(path).absolute()
        access[path] = access.get(path, True) and read_only
    binds: list[tuple[Path, bool]] = []
    for path, read_only in sorted(access.items(), key=lambda b: len(b[0].parts)):
        inside = next((b for b in reversed(binds) if path.is_relative_to(b[0])), None)
        # nested binds where the access differs: the input stays read-only inside a writable folder
        if inside is None or inside[1] != read_only:
            binds.append((path, read_only))
    return binds


def _full_option_names(options: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """bidsenc's options with abbreviations written out (``--participant-lab`` -> ``--participant-label``).

    bidsenc's parser takes unambiguous prefixes; the scripts must not, since each array
    task drops ``--participant-label`` by its full name to give its own. An unknown or
    ambiguous prefix is left as it is for bidsenc's parser to refuse.
    """
    names = [o for o in parser._option_string_actions if o.startswith("--")]  # argparse's table of option names
    full = []
    for token in options:
        name, equals, value = token.partition("=")
        if token.startswith("--") and name != "--" and name not in names:
            matches = [n for n in names if n.startswith(name)]
            if len(matches) == 1:
                token = matches[0] + equals + value
        full.append(token)
    return full


def _option_value(options: list[str], name: str) -> str | None:
    """The value of a single-valued option (last one wins, as in argparse)."""
    value = None
    for i, token in enumerate(options):
        if token == name and i + 1 < len(options):
            value = options[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def _without_labels(options: list[str]) -> list[str]:
    """bidsenc's options less --participant-label and its values (each array task gives its own)."""
    kept, skipping = [], False
    for token in options:
        if token in _LABEL_OPTIONS:
            skipping = True
            continue
        if token.startswith(tuple(o + "=" for o in _LABEL_OPTIONS)):
            continue
        if skipping and not token.startswith("-"):
            continue
        skipping = False
        kept.append(token)
    return kept


def _sbatch_lines(args: list[str]) -> list[str]:
    """#SBATCH lines, one per option given; 'time=1:00:00' is taken for '--time=1:00:00'."""
    return [f"#SBATCH {a if a.startswith('-') else '--' + a}" for a in args]


def _sbatch_value(text: str) -> str:
    """A value of an #SBATCH line in double quotes: sbatch splits these lines at spaces."""
    return f'"{text}"'


def _bidsenc_command(plan: _Plan, ns) -> str:
    """The command line that starts bidsenc in a job: the installed script, or a container."""
    if not ns.container:
        beside = Path(sys.executable).parent / "bidsenc"
        exe = [str(beside)] if beside.exists() else [sys.executable, "-m", "bidsenc.cli.run"]
        return " ".join(shlex.quote(x) for x in exe)
    kind, image = ns.container
    if kind == "docker":
        volumes = [f"-v {shlex.quote(f'{p}:{p}' + (':ro' if ro else ''))}" for p, ro in plan.binds]
        # --gpus only where SLURM gave the job a GPU: docker refuses it on nodes without one
        words = ['docker run --rm ${CUDA_VISIBLE_DEVICES:+--gpus all} -u "$(id -u):$(id -g)"',
                 f"-w {shlex.quote(str(plan.cwd))}", *volumes]
    else:
        runtime = "apptainer" if kind == "apptainer" else "singularity"
        # --nv: the GPU where there is one (a warning only where there is none); --cleanenv: the
        # host's Python and Hugging Face variables stay out
        words = [f"{runtime} run --nv --cleanenv --pwd {shlex.quote(str(plan.cwd))}",
                 *(f"-B {shlex.quote(f'{p}:{p}' + (':ro' if ro else ''))}" for p, ro in plan.binds)]
    return " ".join([*words, *(shlex.quote(o) for o in ns.container_option), shlex.quote(image)])


def _write_scripts(folder: Path, plan: _Plan, ns) -> dict[str, Path]:
    """Write the three batch scripts and the participant list; return the scripts' paths."""
    bidsenc = _bidsenc_command(plan, ns)
    q = shlex.quote
    positional = f"{q(str(plan.bids_dir))} {q(str(plan.output_dir))}"
    options = " ".join(q(o) for o in plan.options)
    per_task = " ".join(q(o) for o in _without_labels(plan.options))
    labels_file = folder / "participants.txt"
    labels_file.write_text("".join(f"{label}\n" for label in plan.labels))
    n = len(plan.labels)
    array = f"1-{n}" + (f"%{ns.throttle}" if ns.throttle else "")

    def header(name: str, log: str, extra: list[str]) -> list[str]:
        # sbatch reads #SBATCH lines only up to the first command
        return ["#!/bin/bash", f"# {name}: written by bidsenc-slurm; submit with sbatch",
                f"#SBATCH --job-name=bidsenc-{name}",
                # --output is a file-name pattern (%j the job id): a '%' of the folder's name is doubled
                f"#SBATCH --output={_sbatch_value(str(folder).replace('%', '%%') + '/' + log)}",
                f"#SBATCH --chdir={_sbatch_value(str(plan.cwd))}", *_sbatch_lines(ns.sbatch_all + extra),
                "set -euo pipefail"]

    scripts = {
        "features": header("features", "features-%j.log", ns.sbatch_features) + [
            "# every story of the selected participants, once, into the shared feature cache",
            f"exec {bidsenc} {positional} participant --features-only {options}".rstrip()],
        # a features job that failed can never let the array start: cancel it rather than leave it
        # pending for ever (the group job, after the array ended either way, then says so)
        "participants": header("participants", "participant-%A_%a.log",
                               [f"--array={array}", "--kill-on-invalid-dep=yes", *ns.sbatch_participants]) + [
            f"label=$(sed -n \"${{SLURM_ARRAY_TASK_ID}}p\" {q(str(labels_file))})",
            f'if [[ -z "$label" ]]; then echo "no participant on line $SLURM_ARRAY_TASK_ID of "'
            f'{q(str(labels_file))} >&2; exit 66; fi',
            'echo "bidsenc-slurm: participant sub-$label (array task $SLURM_ARRAY_TASK_ID)"',
            f'exec {bidsenc} {positional} participant --participant-label "$label" {per_task}'.rstrip()],
        "group": header("group", "group-%j.log", ns.sbatch_group) + [
            "# after every participant job, whatever its outcome: the report names the failed ones",
            f"exec {bidsenc} {positional} group {options}".rstrip()],
    }
    paths = {}
    for name, lines in scripts.items():
        path = folder / f"{name}.sbatch"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        paths[name] = path
    return paths


def _submit_commands(scripts: dict[str, Path]) -> str:
    """The shell commands that submit the scripts as bidsenc-slurm does, ending with its last line."""
    q = {name: shlex.quote(str(path)) for name, path in scripts.items()}
    return (f"f=$(sbatch --parsable {q['features']}) && "
            f"p=$(sbatch --parsable --dependency=afterok:$f {q['participants']}) && "
            f"g=$(sbatch --parsable --dependency=afterany:$p {q['group']}) && "
            'echo "features=$f participants=$p group=$g"')


def _sbatch(args: list[str]) -> str:
    """Submit with ``sbatch --parsable``; return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise _NoSlurm("sbatch not found: SLURM's client commands are not installed or not on PATH "
                       "(--dry-run writes the scripts without submitting)")
    proc = subprocess.run([exe, "--parsable", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise TemporaryFailure(f"sbatch refused {Path(args[-1]).name}: {why}")
    return proc.stdout.strip().split(";")[0]  # "id;cluster" on multi-cluster set-ups


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
