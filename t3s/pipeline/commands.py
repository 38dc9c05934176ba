"""The ``t3s`` stage subcommands, without the command line: settings in, stages run.

`resolve_config` merges the settings of a command (defaults < the run
directory's ``config.json`` < a YAML file < flags); `redo_list` checks
``--redo``; `run_command` checks the run directory and the inputs, then runs
the asked-for stages under the directory's lock. Opening a run directory with
different settings is refused (`RunDirError`) unless ``force`` (keep the
stages the changed settings do not affect, redo the others) or ``overwrite``
(start afresh).

Under a launcher (``torchrun`` / ``accelerate launch`` with ``WORLD_SIZE`` > 1)
every rank calls `run_command`: it joins the launcher's process group
(`t3s.dist.init_from_launcher`), rank 0 does the checks, holds the lock and
owns the run directory, and an error it finds stops every rank with its
message printed once (`t3s.dist.on_main`); the stages then run as
`t3s.pipeline.engine` says. ``batch_size`` stays the global batch: each rank
trains on its slice of every batch (`t3s.pipeline.training.training_args`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import dist
from .console import quiet_libraries, show_progress
from ..dllm.pipeline import is_diffusion
from .diagnostics import analysis_settings
from .sensitivity import sensitivity_settings
from .engine import run_stages, stage_status
from .generators import check_engine
from .loaders import check_attention, check_jsonl, check_model_dir, resolve_device
from .rundir import CONFIG_FILE, LOCK_FILE, RunDir, RunDirError
from .settings import (
    DEFAULTS,
    UsageError,
    check_rule_params,
    load_yaml,
    normalize_config,
    path_fingerprints,
    settings_from,
)
from .stages import FORCED_MSG, NEEDS_MODEL, NEEDS_TRAIN, STAGE_NAMES, STAGES
from .student import STUDENT_STAGES, check_cross_model

__all__ = ["resolve_config", "redo_list", "check_inputs", "check_single_process",
           "check_launch", "check_extras", "launch_notes", "run_command"]

#: what the `t3s` command's stages and its demo import, all in the ``hf`` extra
#: (the core package installs the library and the command, not the Hugging Face stack)
HF_MODULES = (("transformers", "transformers"), ("accelerate", "accelerate"),
              ("tokenizers", "tokenizers"))
#: the oldest transformers the loaders work with: they pass ``dtype=``, which older
#: versions take for a config attribute and ignore (the model then loads in float32)
MIN_TRANSFORMERS = (4, 56)


def check_single_process(what: str) -> None:
    """Refuse to start ``what`` (a command run in one process only: the diffusion
    objective) under a multi-process launcher; UsageError before anything is touched."""
    world = dist.launched_world_size()
    if world > 1:
        raise UsageError(
            f"{what} runs in one process, but it was started by a launcher with "
            f"WORLD_SIZE={world} (torchrun / accelerate launch): start it directly (the "
            "autoregressive pipeline, `t3s run` and `t3s demo`, runs under a launcher)")


def check_extras(verifier: Optional[str] = "math") -> None:
    """One UsageError line naming the extra to install when what the command needs is
    missing: transformers, accelerate and tokenizers (the ``hf`` extra), transformers
    older than `MIN_TRANSFORMERS`, and math-verify for ``verifier`` "math". Checked
    before any work, without importing them (``importlib.util.find_spec``)."""
    import importlib.metadata
    import importlib.util
    import re

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):   # a parent missing, or a broken entry
            return False

    missing = [dist_name for module, dist_name in HF_MODULES if not installed(module)]
    if verifier == "math" and not installed("math_verify"):
        missing.append("math-verify")
    if missing:
        why = " (--verifier math, the default, needs math-verify; --verifier exact does " \
              "not)" if missing == ["math-verify"] else ""
        raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                         f"installed: the t3s command needs the hf extra, pip install "
                         f"'t3s[hf]'{why}")
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:   # importable without metadata: trust it
        return
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < MIN_TRANSFORMERS:
        raise UsageError(f"transformers {version} is older than t3s needs "
                         f"({'.'.join(map(str, MIN_TRANSFORMERS))}): pip install -U 't3s[hf]'")


def check_launch(cfg: Mapping[str, Any]) -> None:
    """Under a launcher: what cannot run across ranks, refused up front."""
    world = dist.world_size()
    if world == 1:
        return
    if is_diffusion(cfg):
        check_single_process("`--objective diffusion`")
    if cfg["batch_size"] % world:
        raise UsageError(f"--batch-size {cfg['batch_size']} is the global batch, split over the "
                         f"{world} ranks: it must be a multiple of {world}")


def launch_notes(cfg: Mapping[str, Any]) -> List[str]:
    """What of the launcher's setup does not apply here, said instead of ignored."""
    notes = []
    # accelerate sets FSDP only for accelerator processes (DeepSpeed runs on CPU ones)
    if (dist.world_size() > 1 and resolve_device(cfg) == "cpu"
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        notes.append("the accelerate config asks for FSDP, which accelerate does not apply to "
                     "CPU processes: the ranks train with DDP (the same results; FSDP applies "
                     "on GPUs)")
    return notes


def resolve_config(flags: Mapping[str, Any], *, config_file: Optional[str] = None,
                   overwrite: bool = False
                   ) -> Tuple[Dict[str, Any], RunDir, Optional[Dict[str, Any]]]:
    """(settings, run directory, stored config or None) for a command's ``flags``
    (setting name -> value, only those given) and YAML ``config_file``.

    Order, later wins: defaults < the run directory's config.json < the YAML
    file < flags. ``rule_params``/``baseline_params`` merge key by key.
    ``overwrite``: the stored config is ignored.
    """
    yaml_vals: Dict[str, Any] = {}
    if config_file:
        path = os.path.abspath(config_file)
        yaml_vals = settings_from(load_yaml(path), base_dir=os.path.dirname(path),
                                  where=f"{config_file}: ")
    flags = settings_from(flags)
    run_dir = flags.get("run_dir") or yaml_vals.get("run_dir") or \
        os.path.abspath(DEFAULTS["run_dir"])
    run = RunDir(run_dir)
    stored = None if overwrite else run.load_config()
    merged: Dict[str, Any] = dict(stored["config"]) if stored else {}
    # progress bars follow this invocation's terminal, not the one of the run before
    merged.pop("progress", None)
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


def redo_list(command: str, redo: Sequence[str]) -> List[str]:
    """The stages ``--redo`` names ('all': every stage), checked against ``command``
    (a stage subcommand runs its own stage only)."""
    out = list(STAGE_NAMES) if "all" in redo else list(dict.fromkeys(redo))
    if command != "run":
        extra = [r for r in out if r != command]
        if extra:
            raise UsageError(f"`t3s {command}` runs only the {command} stage; --redo "
                             f"{' '.join(extra)} needs `t3s run` or `t3s {extra[0]}`")
    return out


def check_inputs(cfg: Mapping[str, Any], pending: Sequence[str],
                 command: str) -> Optional[str]:
    """Fail before any work on what the pending stages would trip over; returns a note
    to say once, or None."""
    # the selector's stages (the student's are checked by check_cross_model)
    on_selector = [s for s in pending if s in NEEDS_MODEL
                   and not (cfg.get("student") and s in STUDENT_STAGES)
                   and not (cfg.get("artifact") and s == "select")]
    if on_selector:
        check_model_dir(cfg["model"], trust_remote_code=cfg["trust_remote_code"])
        if cfg["tokenizer"]:
            check_model_dir(cfg["tokenizer"], trust_remote_code=cfg["trust_remote_code"],
                            what="tokenizer")
    if any(s in NEEDS_TRAIN for s in pending) and cfg["train"] is None:
        raise UsageError("no training data given: pass --train FILE.jsonl or set 'train' in the "
                         "config file")
    uses = {"train": NEEDS_TRAIN,
            "heldout": ("pilot", "train", "baseline", "arms", "eval", "sensitivity"),
            "test": ("eval", "sensitivity"), "extra_test": ("eval", "sensitivity")}
    for key, stages in uses.items():
        if cfg[key] is not None and any(s in stages for s in pending):
            check_jsonl(cfg[key], key)
    if is_diffusion(cfg):   # the forced set trains the diffusion model
        if any(s in ("train", "baseline", "eval") for s in pending):
            check_model_dir(cfg["diffusion_model"], trust_remote_code=cfg["trust_remote_code"],
                            what="diffusion_model")
    elif cfg["rule"] == "forced" and ("train" in pending or command == "run"):
        raise UsageError(FORCED_MSG)
    if not is_diffusion(cfg) and cfg["baseline"] == "random" and cfg["rule"] == "forced" and not any(
            k in cfg["baseline_params"] for k in ("keep_fraction", "budget", "like")):
        raise UsageError("baseline 'random' keeps as many tokens as the rule by default, but "
                         "rule 'forced' is not a loss mask; pass --baseline-param "
                         "keep_fraction=F (or --baseline none)")
    check_rule_params(cfg)
    check_engine(cfg, pending)
    if any(s in NEEDS_MODEL for s in pending):
        check_attention(cfg)
    if "analyze" in pending:
        analysis_settings(cfg, pending)
    if "sensitivity" in pending:
        sensitivity_settings(cfg)
    check_launch(cfg)
    return check_cross_model(cfg, pending)


def _check_run_dir(run: RunDir, overwrite: bool) -> None:
    foreign = run.path.exists() and not run.is_run_dir() and \
        any(p.name != LOCK_FILE for p in run.path.iterdir())
    if foreign and overwrite:
        raise RunDirError(f"{run.path} is not a t3s run directory (no {CONFIG_FILE}); refusing to "
                          "delete it with --overwrite: choose another --run-dir")
    if foreign:
        raise RunDirError(f"{run.path} exists and is not a t3s run directory (no {CONFIG_FILE}); "
                          "choose another --run-dir")


def run_command(command: str, cfg: Dict[str, Any], run: RunDir,
                stored: Optional[Mapping[str, Any]], *, redo: Sequence[str] = (),
                force: bool = False, overwrite: bool = False, debug: bool = False,
                say: Callable[[str], None] = print) -> Dict[str, str]:
    """Run ``command`` ("run" or a stage name) with the settings `resolve_config`
    gave; returns `run_stages`' outcome (stage -> "ran", "done before", "skipped")."""
    dist.init_from_launcher(resolve_device(cfg))
    # `t3s analyze` / `t3s sensitivity` also bring the report up to date (it has their section)
    targets = list(STAGE_NAMES) if command == "run" else \
        [command] + (["report"] if command in ("analyze", "sensitivity") else [])
    # rank 0 checks; its error (or its go-ahead) reaches every rank
    fps, note = dist.on_main(_plan, command, targets, cfg, run, stored, redo, force, overwrite)
    quiet_libraries(show_progress(cfg["progress"]) and dist.is_main(), debug)
    if dist.is_main():
        for line in launch_notes(cfg) + ([note] if note else []):
            say(f"t3s: {line}")
    if cfg["threads"]:
        import torch
        torch.set_num_threads(cfg["threads"])
    with contextlib.ExitStack() as held:
        dist.on_main(_start, held, run, cfg, fps, overwrite, say)
        return run_stages(run, cfg, fps, targets, redo=redo, say=say,
                          explicit=command != "run", stages=STAGES)


def _plan(command: str, targets: Sequence[str], cfg: Dict[str, Any], run: RunDir, stored,
          redo, force: bool, overwrite: bool) -> Dict[str, Any]:
    """Rank 0: every check `run_command` makes before it starts (``targets``: the stages
    the command runs); (the path fingerprints, a note of the checks or None)."""
    check_extras(cfg["verifier"])
    fps = path_fingerprints(cfg, stored)
    _check_run_dir(run, overwrite)
    if stored is not None:
        diff = run.config_diff(cfg, fps)
        if diff and not force:
            raise RunDirError(
                f"{run.path} holds a run with other settings: {'; '.join(diff)}. Pass --force to "
                "keep the finished stages these settings do not affect and redo the others, or "
                "--overwrite to start afresh (or choose another --run-dir)")
    status = stage_status(run, cfg, fps, redo=redo, stages=STAGES) \
        if stored is not None and not overwrite else {s: (None, "") for s in STAGE_NAMES}
    enabled = {s.name for s in STAGES if s.enabled(cfg)}
    pending = [s for s in targets if status[s][0] is None and (s in enabled or command != "run")]
    if command != "run":
        stage = next(s for s in STAGES if s.name == command)
        if not stage.enabled(cfg):
            how = ("arms is empty; pass --arms A,B,..." if command == "arms" else
                   "baseline is none; pass --baseline RULE")
            raise RunDirError(f"stage {command!r} is disabled by the settings ({how})")
        for dep in stage.deps(cfg):
            if status[dep][0] is None:
                why = status[dep][1] or "not run yet"
                raise RunDirError(f"stage {command!r} needs stage {dep!r}, which is {why} in "
                                  f"{run.path}; run `t3s {dep}` (or `t3s run`) first")
    return fps, check_inputs(cfg, pending, command)


def _start(held: contextlib.ExitStack, run: RunDir, cfg, fps, overwrite: bool, say) -> None:
    """Rank 0: the directory's lock (held until ``held`` closes), --overwrite, config.json."""
    held.enter_context(run.locked())
    if overwrite:
        say(f"t3s: starting {run.path} afresh (--overwrite)")
        run.wipe()
    run.write_config(cfg, fps)
