"""The ``t3s`` command.

    t3s run    --model DIR --train traces.jsonl --heldout heldout.jsonl [--run-dir DIR] [...]
    t3s pilot | select | train | baseline | eval | report   [same options]
    t3s demo   [--quick] [--out DIR] [--seed N]

``t3s run`` runs the stages of `t3s.run` (pilot, select, train, baseline,
eval, report) in a run directory and resumes after the last finished one;
each other subcommand runs one stage. Settings come from flags or from one
YAML file (``--config run.yaml``; keys are the flag names with underscores,
relative paths in it are relative to the file); flags override the file, and
both override the settings stored in an existing run directory. Changing a
setting that affects results in an existing run directory is refused unless
``--force`` (redo the affected stages) or ``--overwrite`` (start afresh).

Errors a user can fix (missing model, a model needing ``--trust-remote-code``,
bad JSONL, an empty dataset, a run directory from another configuration, ...)
print one line ``t3s: error: ...`` and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

from .run import (
    _PATH_KEYS,
    DEFAULTS,
    OPTIONS,
    RunDir,
    RunDirError,
    UsageError,
    check_model_dir,
    check_rule_params,
    fingerprint_path,
    normalize_config,
    run_stages,
    settings_from,
    stage_status,
)
from .stages import NEEDS_MODEL, NEEDS_TRAIN, STAGE_NAMES, STAGES

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
    "selection": ("delta", "agreement", "rule", "rule_params", "baseline", "baseline_params"),
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
            flag = "--rule-param" if o.name == "rule_params" else "--baseline-param"
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
        "run": "all stages: pilot, select, train, baseline, eval, report (resumable)",
        "pilot": helps["pilot"],
        "select": helps["select"] + " (any rule of t3s.selection.RULES)",
        "train": helps["train"] + " (--rule none: plain SFT)",
        "baseline": helps["baseline"],
        "eval": helps["eval"],
        "report": helps["report"],
    }
    for name, text in sub_help.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_options(p)
    demo = sub.add_parser("demo", help="the built-in CPU demo (no download)",
                          description="Reproduce imitation shock and T3S on a synthetic task.")
    demo.add_argument("--quick", action="store_true", help="the short variant (for tests)")
    demo.add_argument("--out", default=None, metavar="DIR", help="output directory (runs/demo; runs/demo-quick with --quick)")
    demo.add_argument("--seed", type=int, default=None, metavar="N",
                      help="seed of the traces, held-out problems and data order (default 0; "
                           "the base student is the same)")
    demo.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

def load_yaml(path: str) -> Dict[str, Any]:
    """The settings in a YAML file (a mapping; unknown keys are errors)."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path}{where}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings, got "
                         f"{type(data).__name__}")
    return data


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
    """(settings, run directory, stored config or None) for parsed ``args``.

    Order, later wins: defaults < the run directory's config.json < the YAML
    file < flags. ``rule_params``/``baseline_params`` merge key by key.
    """
    yaml_vals: Dict[str, Any] = {}
    if args.config:
        path = os.path.abspath(args.config)
        yaml_vals = settings_from(load_yaml(path), base_dir=os.path.dirname(path),
                                  where=f"{args.config}: ")
    flags = settings_from(_flag_values(args))
    run_dir = flags.get("run_dir") or yaml_vals.get("run_dir") or \
        os.path.abspath(DEFAULTS["run_dir"])
    run = RunDir(run_dir)
    stored = None if args.overwrite else run.load_config()
    merged: Dict[str, Any] = dict(stored["config"]) if stored else {}
    for source in (yaml_vals, flags):
        before = dict(merged)
        for key, value in source.items():
            if key in ("rule_params", "baseline_params"):
                # Parameters merge key by key for the same rule; a new rule starts afresh.
                rule_key = "rule" if key == "rule_params" else "baseline"
                same_rule = rule_key not in source or source[rule_key] == before.get(rule_key)
                old = before.get(key) if same_rule and isinstance(before.get(key), dict) else {}
                merged[key] = {**old, **value}
            else:
                if key in ("rule", "baseline") and before.get(key) not in (None, value):
                    pkey = "rule_params" if key == "rule" else "baseline_params"
                    if pkey not in source:
                        merged[pkey] = {}
                merged[key] = value
    merged["run_dir"] = run_dir
    cfg = normalize_config(merged)
    return cfg, run, stored


def _fingerprints(cfg: Dict[str, Any], stored: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    old_cfg = (stored or {}).get("config") or {}
    old_fp = (stored or {}).get("fingerprints") or {}
    out = {}
    for key in _PATH_KEYS:
        fp = fingerprint_path(cfg[key])
        if fp is None and cfg[key] is not None and old_cfg.get(key) == cfg[key]:
            fp = old_fp.get(key)  # gone since; the stages that need it will say so
        out[key] = fp
    return out


def _dump_yaml(cfg: Dict[str, Any]) -> str:
    import yaml
    ordered = {o.name: cfg[o.name] for o in OPTIONS}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

def _check_jsonl(path: str, key: str) -> None:
    """Parse (not tokenize) a traces file: bad lines and empty files fail before any work."""
    from .data import read_traces
    from .run import _DATA_WHAT
    what = _DATA_WHAT[key]
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} not found")
    try:
        records = read_traces(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"bad {what}: {path} is not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise UsageError(f"bad {what}: {_one_line(e)}") from None
    if not records:
        raise UsageError(f"{what} {path} holds no examples")


def _check_inputs(cfg: Dict[str, Any], pending: Sequence[str], command: str) -> None:
    """Fail before any work on what the pending stages would trip over."""
    if any(s in NEEDS_MODEL for s in pending):
        check_model_dir(cfg["model"], trust_remote_code=cfg["trust_remote_code"])
        if cfg["tokenizer"]:
            check_model_dir(cfg["tokenizer"], trust_remote_code=cfg["trust_remote_code"],
                            what="tokenizer")
    if any(s in NEEDS_TRAIN for s in pending) and cfg["train"] is None:
        raise UsageError("no training data given: pass --train FILE.jsonl or set 'train' in the "
                         "config file")
    uses = {"train": NEEDS_TRAIN, "heldout": ("pilot", "train", "baseline", "eval"),
            "test": ("eval",), "extra_test": ("eval",)}
    for key, stages in uses.items():
        if cfg[key] is not None and any(s in stages for s in pending):
            _check_jsonl(cfg[key], key)
    if cfg["rule"] == "forced" and ("train" in pending or command == "run"):
        from .stages import _FORCED_MSG
        raise UsageError(_FORCED_MSG)
    if cfg["baseline"] == "random" and cfg["rule"] == "forced" and not any(
            k in cfg["baseline_params"] for k in ("keep_fraction", "budget", "like")):
        raise UsageError("baseline 'random' keeps as many tokens as the rule by default, but "
                         "rule 'forced' is not a loss mask; pass --baseline-param "
                         "keep_fraction=F (or --baseline none)")
    check_rule_params(cfg)


def _run_command(args: argparse.Namespace, say) -> int:
    cfg, run, stored = resolve_config(args)
    fps = _fingerprints(cfg, stored)
    command = args.command
    targets = list(STAGE_NAMES) if command == "run" else [command]
    redo = list(STAGE_NAMES) if "all" in args.redo else list(dict.fromkeys(args.redo))
    if command != "run":
        redo_extra = [r for r in redo if r != command]
        if redo_extra:
            raise UsageError(f"`t3s {command}` runs only the {command} stage; --redo "
                             f"{' '.join(redo_extra)} needs `t3s run` or `t3s {redo_extra[0]}`")
    if args.print_config:
        sys.stdout.write(_dump_yaml(cfg))
        return 0
    if run.path.exists() and not run.is_run_dir() and not args.overwrite:
        leftovers = [p.name for p in run.path.iterdir() if p.name != ".lock"]
        if leftovers:
            raise RunDirError(f"{run.path} exists and is not a t3s run directory (no config.json); "
                              "choose another --run-dir")
    if args.overwrite and run.path.exists() and not run.is_run_dir() and \
            any(p.name != ".lock" for p in run.path.iterdir()):
        raise RunDirError(f"{run.path} is not a t3s run directory (no config.json); refusing to "
                          "delete it with --overwrite: choose another --run-dir")

    if stored is not None:
        diff = run.config_diff(cfg, fps)
        if diff and not args.force:
            raise RunDirError(
                f"{run.path} holds a run with other settings: {'; '.join(diff)}. Pass --force to "
                "keep the finished stages these settings do not affect and redo the others, or "
                "--overwrite to start afresh (or choose another --run-dir)")
    status = stage_status(run, cfg, fps, redo=redo) if stored is not None and not args.overwrite \
        else {s: (None, "") for s in STAGE_NAMES}
    enabled = {s.name for s in STAGES if s.enabled(cfg)}
    pending = [s for s in targets if status[s][0] is None and (s in enabled or command != "run")]
    if command != "run":
        stage = next(s for s in STAGES if s.name == command)
        if not stage.enabled(cfg):
            raise RunDirError(f"stage {command!r} is disabled by the settings (baseline is none; "
                              "pass --baseline RULE)")
        for dep in stage.deps(cfg):
            if status[dep][0] is None:
                why = status[dep][1] or "not run yet"
                raise RunDirError(f"stage {command!r} needs stage {dep!r}, which is {why} in "
                                  f"{run.path}; run `t3s {dep}` (or `t3s run`) first")
    _check_inputs(cfg, pending, command)

    _quiet_libraries(cfg["progress"], args.debug)
    if cfg["threads"]:
        import torch
        torch.set_num_threads(cfg["threads"])
    with run.locked():
        if args.overwrite:
            say(f"t3s: starting {run.path} afresh (--overwrite)")
            run.wipe()
        run.write_config(cfg, fps)
        outcome = run_stages(run, cfg, fps, targets, redo=redo, say=say,
                             explicit=command != "run")
    if not any(v == "ran" for v in outcome.values()):
        say(f"t3s: nothing to do in {run.path}: every stage asked for is done "
            "(--redo STAGE runs one again)")
    report = run.stage_dir("report") / "report.md"
    if "report" in outcome and report.is_file():
        _print_metrics(run, say)
    return 0


def _print_metrics(run: RunDir, say) -> None:
    import json
    path = run.stage_dir("report") / "metrics.json"
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        m = json.load(f)

    def fmt(x):
        return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    say("t3s: " + ", ".join(f"{k} {fmt(m.get(k))}" for k in
                             ("base_acc", "sft_acc", "t3s_acc", "baseline_acc", "bottleneck_step",
                              "masked_fraction", "mask_agreement")))
    say(f"t3s: report in {run.stage_dir('report') / 'report.md'}")


def _quiet_libraries(progress: bool, debug: bool) -> None:
    """transformers' warnings and per-file download bars off unless --debug."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    if not debug:
        hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()


def _demo(args: argparse.Namespace, say) -> int:
    try:
        import t3s.demo as demo
    except ImportError as e:
        raise UsageError(f"the demo cannot be imported: {e}") from None
    fn = getattr(demo, "main", None)
    if not callable(fn):
        raise UsageError("this installation's t3s.demo has no main(); the demo is not available "
                         "in this version")
    kw = {} if args.seed is None else {"seed": args.seed}
    result = fn(quick=args.quick, out=args.out, **kw)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


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

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        if args.command == "demo":
            return _demo(args, say)
        return _run_command(args, say)
    except UsageError as e:
        if debug:
            raise
        print(f"t3s: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, ImportError) as e:
        if debug:
            raise
        print(f"t3s: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("t3s: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
