"""The ``t3s`` command.

    t3s run    --model DIR --train traces.jsonl --heldout heldout.jsonl [--run-dir DIR] [...]
    t3s pilot | select | train | baseline | arms | eval | report   [same options]
    t3s analyze RUN_DIR [--analysis-param KEY=VALUE ...]    (the diagnostics, then the report)
    t3s sensitivity RUN_DIR [--sensitivity-param KEY=VALUE ...]   (other bottlenecks, then
                                                                the report)
    t3s demo   [--quick] [--task NAME] [--out DIR] [--seed N | --seeds LIST] [--redo STAGE]
               [--overwrite] [--no-progress]

``t3s run`` runs the stages of `t3s.pipeline.stages` (pilot, select, train,
baseline, arms, eval, report) in a run directory and resumes after the last finished one;
each other subcommand runs one stage. Settings come from flags or from one
YAML file (``--config run.yaml``; keys are the flag names with underscores,
relative paths in it are relative to the file); flags override the file, and
both override the settings stored in an existing run directory. Changing a
setting that affects results in an existing run directory is refused unless
``--force`` (redo the affected stages) or ``--overwrite`` (start afresh).

``t3s demo`` runs the same stages on the built-in task (`t3s.demo`); its
``--redo`` and ``--overwrite`` mean what they mean for ``t3s run``. Progress bars
are drawn only when stderr is a terminal, unless ``--progress`` or
``--no-progress`` says otherwise (both commands).

Errors a user can fix (missing model, a model needing ``--trust-remote-code``,
bad JSONL, an empty dataset, a run directory from another configuration, ...)
print one line ``t3s: error: ...`` and exit with status 2; ``--debug`` shows
the traceback instead.

This module is the shell: argument parsing, and printing what
`t3s.pipeline.commands` and the demo (`t3s.demo`) do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import dist
from ._util import one_line
from .pipeline import commands
from .pipeline.console import print_metrics, say
from .pipeline.rundir import REPORT_FILE
from .pipeline.settings import OPTIONS, UsageError, dump_yaml, load_yaml
from .pipeline.stages import STAGE_NAMES, STAGES

__all__ = ["main", "build_parser", "resolve_config", "load_yaml"]


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------

def _params_arg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    import yaml
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


_GROUPS = {
    "model and data": ("model", "tokenizer", "trust_remote_code", "train", "heldout", "test",
                       "extra_test", "max_length", "truncation"),
    "hardware": ("device", "dtype", "threads"),
    "selection": ("delta", "agreement", "rule", "rule_params", "baseline", "baseline_params",
                  "arms"),
    "run directory": ("run_dir", "progress"),
}


def _add_options(p: argparse.ArgumentParser) -> None:
    groups = {t: p.add_argument_group(t) for t in
              ("model and data", "hardware", "training and evaluation", "selection",
               "run directory")}
    g = groups["run directory"]
    g.add_argument("--config", metavar="YAML",
                   help="settings from one YAML file (keys: the flag names with underscores; "
                        "flags override it)")
    g.add_argument("--force", action="store_true",
                   help="accept changed settings in an existing run directory: keep the stages "
                        "they do not affect, redo the others")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run directory's contents and start afresh")
    g.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   choices=list(STAGE_NAMES) + ["all"],
                   help="run this stage again (repeatable; 'all'); the stages that use its "
                        "outputs follow")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as YAML and exit")
    g.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    for o in OPTIONS:
        title = next((t for t, names in _GROUPS.items() if o.name in names),
                     "training and evaluation")
        g = groups[title]
        default = "" if o.default is None else f" (default: {o.default})"
        kw: Dict[str, Any] = dict(dest=o.name, default=argparse.SUPPRESS)
        if o.kind == "bool":
            g.add_argument(o.flag, action=argparse.BooleanOptionalAction,
                           help=o.help + default, **kw)
        elif o.kind == "params":
            flag = o.flag[:-1]   # --rule-param, --baseline-param, --analysis-param
            g.add_argument(flag, action="append", type=_params_arg, metavar=o.metavar,
                           help=o.help, **kw)
        else:
            typ = {"int": int, "float": float}.get(o.kind, str)
            extra = dict(choices=o.choices) if o.kind == "choice" else {}
            metavar = o.metavar or (None if o.kind == "choice" else o.name.upper())
            g.add_argument(o.flag, type=typ, metavar=metavar, help=o.help + default, **extra,
                           **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t3s", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training-Trajectory-Aware Token Selection (T3S): pilot SFT, bottleneck, "
                    "Δc, masks, retraining, evaluation and a report, in a resumable run "
                    "directory.",
        epilog="Run `t3s SUBCOMMAND --help` for the settings. Example:\n"
               "  t3s run --model ./qwen3-0.6b --train traces.jsonl --heldout heldout.jsonl \\\n"
               "          --run-dir runs/qwen --steps 50 --lr 1e-5 --batch-size 8 --grad-accum 8")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    helps = {s.name: s.help for s in STAGES}
    sub_help = {
        "run": "all stages: pilot, select, train, baseline, arms, eval, report (resumable; "
               "--analyze and --sensitivity add those stages)",
        "pilot": helps["pilot"],
        "select": helps["select"] + " (any rule of t3s.selection.RULES)",
        "train": helps["train"] + " (--rule none: plain SFT)",
        "baseline": helps["baseline"],
        "arms": helps["arms"],
        "eval": helps["eval"],
        "analyze": helps["analyze"] + "; then the report",
        "sensitivity": helps["sensitivity"] + "; then the report",
        "report": helps["report"],
    }
    for name, text in sub_help.items():
        p = sub.add_parser(name, help=text, description=text)
        if name in ("analyze", "sensitivity"):   # `t3s analyze RUN_DIR` (or --run-dir)
            p.add_argument("run_dir_arg", nargs="?", metavar="RUN_DIR",
                           help="the run directory (the same as --run-dir)")
        _add_options(p)
    demo = sub.add_parser("demo", help="the built-in CPU demo (no download)",
                          description="Reproduce imitation shock and T3S on a synthetic task.")
    demo.add_argument("--quick", action="store_true", help="the short variant (for tests)")
    demo.add_argument("--diffusion", action="store_true",
                      help="T3S for a diffusion LM: the AR student selects, a bidirectional "
                           "student trains (plain SFT, T3S forced set, random set of its size)")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="output directory (runs/demo; runs/demo-quick with --quick; "
                           "runs/demo-diffusion[-quick] with --diffusion)")
    demo.add_argument("--task", default=None, metavar="NAME",
                      help="the built-in task (t3s.demo.tasks): 'teach' (the default: the "
                           "teacher's traces add 4-term sums the base lacks; plain SFT crashes, "
                           "then recovers) or 'style' (the first demo, and the default of "
                           "--diffusion: the traces restyle what the base does)")
    demo.add_argument("--seed", type=int, default=None, metavar="N",
                      help="seed of the traces, held-out problems and data order (default 0; "
                           "the base student is the same)")
    demo.add_argument("--seeds", default=None, metavar="LIST",
                      help="run every seed (e.g. 0,1,2 or 0-2) into DIR/seed-<s>/ and summarise "
                           "them as mean ± standard error in DIR/summary/")
    # the same meaning as for `t3s run` (the demo's own messages name them)
    demo.add_argument("--engine", default=None, choices=("hf", "vllm"),
                      help="what generates the answers (as for `t3s run`): hf (the default) or "
                           "vllm (the [vllm] extra, docs/generation.md)")
    demo.add_argument("--redo", action="append", default=[], metavar="STAGE",
                      choices=list(STAGE_NAMES) + ["all"],
                      help="run this stage again (repeatable; 'all'); the stages that use its "
                           "outputs follow")
    demo.add_argument("--overwrite", action="store_true",
                      help="delete the directory's run and start afresh (also when it holds a "
                           "demo run with other settings)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: on when stderr is a terminal, off when it "
                           "is redirected)")
    demo.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

def _flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for o in OPTIONS:
        if hasattr(args, o.name):
            value = getattr(args, o.name)
            if o.kind == "params":
                value = dict(value)
            out[o.name] = value
    return out


def resolve_config(args: argparse.Namespace):
    """(settings, run directory, stored config or None) for parsed ``args``
    (`t3s.pipeline.commands.resolve_config`)."""
    flags = _flag_values(args)
    if args.command in ("analyze", "sensitivity"):
        if getattr(args, "run_dir_arg", None):
            if "run_dir" in flags and flags["run_dir"] != args.run_dir_arg:
                raise UsageError("give the run directory once: RUN_DIR or --run-dir")
            flags["run_dir"] = args.run_dir_arg
        flags[args.command] = True   # the stage is on from now on, as its setting says
    return commands.resolve_config(flags, config_file=args.config,
                                   overwrite=args.overwrite)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

def _run_command(args: argparse.Namespace) -> int:
    cfg, run, stored = resolve_config(args)
    redo = commands.redo_list(args.command, args.redo)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    outcome = commands.run_command(args.command, cfg, run, stored, redo=redo, force=args.force,
                                   overwrite=args.overwrite, debug=args.debug, say=say)
    if not dist.is_main():  # rank 0 prints for every rank
        return 0
    if not any(v == "ran" for v in outcome.values()):
        say(f"t3s: nothing to do in {run.path}: every stage asked for is done "
            "(--redo STAGE runs one again)")
    if "report" in outcome and (run.stage_dir("report") / REPORT_FILE).is_file():
        print_metrics(run, say)
    return 0


def _demo(args: argparse.Namespace) -> int:
    commands.check_extras("math")   # the demo's stages and verifier: one line, not a traceback
    try:
        import t3s.demo as demo
    except ImportError as e:
        raise UsageError(f"the demo cannot be imported: {e}") from None
    if args.diffusion:
        commands.check_single_process("`t3s demo --diffusion`")
        from t3s.dllm import demo
    fn = getattr(demo, "main", None)
    if not callable(fn):
        raise UsageError("this installation's t3s.demo has no main(); the demo is not available "
                         "in this version")
    # only what was given, so the demo's own defaults stay its defaults
    kw: Dict[str, Any] = {} if args.seed is None else {"seed": args.seed}
    if args.task is not None:
        kw["task"] = args.task
    if args.seeds is not None:
        if args.diffusion:
            raise UsageError("--seeds is not available with --diffusion")
        if args.seed is not None:
            raise UsageError("give --seed or --seeds, not both")
        from t3s.demo.seeds import parse_seeds
        try:
            kw["seeds"] = parse_seeds(args.seeds)
        except ValueError as e:
            raise UsageError(f"--seeds: {e}") from None
    if args.engine is not None:
        if args.diffusion and args.engine != "hf":
            raise UsageError("--engine vllm does not apply to --diffusion: a diffusion model "
                             "generates by iterative unmasking")
        kw["engine"] = args.engine
    if args.redo:
        kw["redo"] = list(args.redo)
    if args.overwrite:
        kw["overwrite"] = True
    if args.progress is not None:
        kw["progress"] = args.progress
    result = fn(quick=args.quick, out=args.out, **kw)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


#: how libraries that wrap the OS error say the disk is full (safetensors' SafetensorError
#: "No space left on device (os error 28)", torch.save's "file write failed")
_WRITE_FAILURES = ("no space left on device", "os error 28", "disk quota exceeded",
                   "file write failed")


def storage_failure(e: BaseException) -> Optional[BaseException]:
    """The I/O failure behind ``e``, or None: an `OSError`, or a library's exception that
    wraps one (found in its message or its cause chain)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or any(m in str(e).lower() for m in _WRITE_FAILURES):
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: BaseException, directory: Optional[str] = None) -> str:
    """One line for an I/O error: what failed, on which file, and the free space left
    in ``directory`` (the run directory) when it is known."""
    import errno
    import shutil
    filename = getattr(e, "filename", None)
    where = f" writing {filename}" if filename else (f" writing into {directory}"
                                                     if directory else "")
    text = str(e).lower()
    if getattr(e, "errno", None) == errno.ENOSPC or any(m in text for m in _WRITE_FAILURES):
        free = ""
        try:
            if directory:
                probe = Path(directory)
                while not probe.exists() and probe != probe.parent:
                    probe = probe.parent
                free = f" ({shutil.disk_usage(probe).free / 2**20:.1f} MiB free there)"
        except OSError:
            pass
        return f"no space left on the device{where}{free}"
    return f"I/O error{where}: {getattr(e, 'strerror', None) or one_line(e)}"


def _leave_process_group(status: int) -> None:
    """End a finished multi-rank command: leave the process group, flush, and exit at
    once. A normal interpreter exit can still abort (SIGABRT, "terminate called without
    an active exception") while gloo's communication threads are torn down, and the
    launcher would then report a finished run as failed."""
    dist.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``t3s`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2), already printed
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    if debug:
        logging.basicConfig(level=logging.INFO)
    try:
        status = _demo(args) if args.command == "demo" else _run_command(args)
        if dist.world_size() > 1:
            _leave_process_group(status)
        return status
    except UsageError as e:
        if debug:
            raise
        _error(e, one_line(e))
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, ImportError) as e:
        if debug:
            raise
        _error(e, f"{one_line(e)} (--debug shows the traceback)")
        return 2
    except KeyboardInterrupt:
        if dist.is_main():
            print("t3s: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk or another I/O error while writing the run
        failure = storage_failure(e)
        if debug or failure is None:
            raise
        directory = getattr(args, "run_dir", None) or getattr(args, "out", None)
        _error(e, f"{describe_os_error(failure, directory)}; free space or fix the "
               "file system, then run the same command again to resume (--debug shows the "
               "traceback)")
        return 1


def _error(e: BaseException, message: str) -> None:
    """``t3s: error: ...`` on stderr; under a launcher rank 0's errors are printed by
    rank 0 only (the other ranks' copies carry ``from_main``), another rank's own error
    names the rank."""
    if getattr(e, "from_main", False):
        return
    where = "" if dist.is_main() else f" (rank {dist.rank()})"
    print(f"t3s: error{where}: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
