"""Run directories and the stages of a T3S run (what ``t3s run`` executes).

This module holds the settings, the run directory and the machinery that runs
stages atomically and resumably; the stage functions are in `t3s.stages`.
A run is six stages, each a function of the settings (`OPTIONS`) and of the
outputs of the stages before it:

=========  ========================================================  ================
stage      what it does                                               needs
=========  ========================================================  ================
pilot      SFT from θ0 on the traces, recording every trained         model, data
           token's log-prob at every step (`t3s.TrajectoryRecorder`)
           and evaluating training / held-out accuracy every
           ``eval_steps`` (`t3s.trainer.AccuracyCallback`); only the
           checkpoint θb is kept. The pilot is also the plain-SFT
           arm of the comparison.
select     bottleneck b, Δc = c(θb) − c(θ0) (online from the          pilot
           trajectory, or exact), the mask under ``rule`` and the
           baseline's mask, as `t3s.SelectionArtifact` files
train      retraining from θ0 with the artifact's loss masks          select (none
           (plain SFT with ``rule: none``)                            with rule none)
baseline   the same with the baseline's masks (only when              select
           ``baseline`` is set)
eval       accuracy with the verifier on the test set (``test``),    model, test set
           the held-out set (``heldout``) and ``extra_test``, of
           θ0 and of every trained model that is current (SFT,
           T3S, baseline); the headline numbers come from
           ``test``, else ``heldout`` (`eval_sets`)
report     figures, ``metrics.json`` and ``report.md``                any stage
           (`t3s.report`)
=========  ========================================================  ================

The bottleneck is the argmin of training accuracy over the evaluations
*after* step 0 *(choice: θ0 is the reference of Δc, so b = 0 would give
Δc ≡ 0)*; ties go to the earliest step.

Layout of a run directory::

    RUN_DIR/
      config.json          the settings, the fingerprints of the files they name, a hash
      stages.json          the ledger: one entry per finished stage
      .lock                held while a process works in the directory
      pilot/   stage.json, trajectory/, t3s_accuracy.json, log_history.json,
               checkpoint-<b>/ (θb), final/ (the SFT model)
      select/  stage.json, selection.parquet, baseline.parquet, delta_online.parquet,
               delta_exact.parquet, profile/, summary.json
      train/   stage.json, model/, t3s_accuracy.json, log_history.json
      baseline/  (as train/)
      eval/    stage.json, results.json, <arm>.jsonl (every prediction on the first set),
               <arm>.heldout.jsonl (on the held-out set, when a test set is first)
      report/  stage.json, report.md, metrics.json, shock.png, delta_hist.png, traces.png
      .partial-<stage>/    a stage at work

Resuming. A stage works in ``.partial-<stage>/``; when its function returns,
its record (``stage.json``) is written last, the directory is renamed to
``<stage>/`` and the ledger is updated (written to a temporary file, then
renamed). A stage is *current* when the ledger has it, its directory exists,
the settings it depends on (`Stage.keys`) hash to the recorded value and the
stages it consumed are the current ones it recorded (by ``run_id``). Running
again skips current stages, so a second ``t3s run`` does nothing. A
``.partial-*`` directory left by a killed run is removed and its stage
started again; a stage renamed into place whose ledger entry was not yet
written is adopted from its ``stage.json``. ``redo`` re-runs the named
stages; the stages that consumed their outputs then are no longer current and
run again too, and nothing upstream is touched.

Settings. ``config.json`` holds every setting; paths are stored absolute, and
the files they name are fingerprinted (data files: sha256 of the content;
model / tokenizer directories: names and sizes of their files plus the
content of those under 64 MiB), so a changed data file counts as a changed
setting. Opening a run directory with different settings is refused
(`RunDirError`) unless ``force`` (keep the stages the changed settings do not
affect, redo the others) or ``overwrite`` (start afresh).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "OPTIONS",
    "Option",
    "DEFAULTS",
    "RULE_ALIASES",
    "STAGES",
    "Stage",
    "RunDir",
    "RunDirError",
    "UsageError",
    "normalize_config",
    "settings_from",
    "canonical_rule",
    "fingerprint_path",
    "run_stages",
    "stage_status",
    "STAGE_NAMES",
    "load_model",
    "load_tokenizer",
    "load_data",
    "check_model_dir",
    "eval_sets",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LEDGER_FILE = "stages.json"
RECORD_FILE = "stage.json"
LOCK_FILE = ".lock"
PARTIAL_PREFIX = ".partial-"
RUN_FORMAT = "t3s.run"
LEDGER_FORMAT = "t3s.stages"
VERSION = 1
_HASH_CONTENT_LIMIT = 64 << 20


class UsageError(ValueError):
    """Bad settings or inputs: the CLI prints the message on one line and exits with 2."""


class RunDirError(UsageError):
    """The run directory cannot be used as asked (other settings, missing stages, locked)."""


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One setting: a YAML key ``name`` and a flag ``--name-with-dashes``.

    kind: "str", "path", "int", "float", "bool", "choice", "params" (a mapping,
    given on the command line as repeated ``--flag key=value``).
    hashed: part of the run's identity (a changed value makes a run directory
    "from a different config"); the others (device, progress, ...) may change
    between invocations.
    """

    name: str
    kind: str
    default: Any
    help: str
    hashed: bool = True
    choices: Tuple[str, ...] = ()
    metavar: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


RULE_ALIASES = {"inverse": "inverse_anchor", "prob": "prob_threshold"}

OPTIONS: Tuple[Option, ...] = (
    # model and data
    Option("model", "path", None, "θ0: a local Hugging Face model directory", metavar="DIR"),
    Option("tokenizer", "path", None, "tokenizer directory (default: the model's)", metavar="DIR"),
    Option("trust_remote_code", "bool", False,
           "allow the model's own Python code (config.json 'auto_map'); off by default",
           hashed=False),
    Option("train", "path", None, "training traces, JSONL (prompt/response/answer or messages)",
           metavar="JSONL"),
    Option("heldout", "path", None, "held-out problems, JSONL: accuracy during training",
           metavar="JSONL"),
    Option("test", "path", None, "test set for `t3s eval`, JSONL (default: --heldout)",
           metavar="JSONL"),
    Option("extra_test", "path", None,
           "a further set `t3s eval` scores and reports next to the test set, JSONL "
           "(e.g. harder problems)", metavar="JSONL"),
    Option("max_length", "int", None, "longest example in tokens (default: no limit)"),
    Option("truncation", "choice", "error", "examples longer than max_length",
           choices=("error", "truncate", "drop")),
    # hardware
    Option("device", "choice", "auto", "where to train and evaluate", hashed=False,
           choices=("auto", "cpu", "cuda")),
    Option("dtype", "choice", "fp32", "dtype the model is loaded and trained in",
           choices=("fp32", "bf16", "fp16")),
    Option("threads", "int", None, "CPU threads for torch (default: torch's choice)",
           hashed=False),
    # training (pilot and retraining share them)
    Option("seed", "int", 0, "seed of the data order, initialisation and subsets"),
    Option("batch_size", "int", 8, "examples per micro-batch"),
    Option("grad_accum", "int", 1, "micro-batches per optimizer step"),
    Option("lr", "float", 1e-5, "learning rate"),
    Option("steps", "int", 50, "optimizer steps of the pilot and of each retraining"),
    Option("lr_scheduler", "str", "constant", "Hugging Face lr_scheduler_type"),
    Option("warmup_steps", "int", 0, "warmup steps"),
    Option("weight_decay", "float", 0.0, "AdamW weight decay"),
    # accuracy
    Option("eval_steps", "int", 5, "evaluate training / held-out accuracy every N steps"),
    Option("eval_subset", "int", 64,
           "training / held-out prompts per evaluation during training (0: all)"),
    Option("max_new_tokens", "int", 512, "tokens generated per answer"),
    Option("verifier", "choice", "math", "answer checker (t3s.verify)", choices=("math", "exact")),
    Option("eval_batch_size", "int", 8, "prompts per generation / profiling batch", hashed=False),
    # selection
    Option("delta", "choice", "online",
           "Δc source: online (from the pilot's trajectory) or exact (forward passes)",
           choices=("online", "exact")),
    Option("agreement", "bool", True,
           "also compute the exact Δc to report online-vs-exact mask agreement"),
    Option("rule", "str", "anchor",
           "selection rule (a name in t3s.selection.RULES, 'inverse', 'prob'; 'none' = plain SFT)"),
    Option("rule_params", "params", None, "a rule parameter, KEY=VALUE (repeatable)",
           metavar="KEY=VALUE"),
    Option("baseline", "str", "none",
           "baseline rule retrained for comparison ('random' keeps the rule's budget; 'none')"),
    Option("baseline_params", "params", None, "a baseline parameter, KEY=VALUE (repeatable)",
           metavar="KEY=VALUE"),
    # the directory
    Option("run_dir", "path", "runs/t3s", "the run directory", hashed=False, metavar="DIR"),
    Option("progress", "bool", True, "progress bars", hashed=False),
)

_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS: Dict[str, Any] = {o.name: o.default for o in OPTIONS}
_PATH_KEYS = ("model", "tokenizer", "train", "heldout", "test", "extra_test")


def canonical_rule(name: Optional[str], what: str = "rule") -> Optional[str]:
    """A rule name as `t3s.selection.RULES` spells it; None for 'none'."""
    from .selection import RULES
    if name is None:
        return None
    name = str(name).strip()
    if name.lower() in ("none", "null", "off", ""):
        return None
    name = RULE_ALIASES.get(name, name)
    if name not in RULES:
        known = sorted(set(RULES) | set(RULE_ALIASES) | {"none"})
        raise UsageError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return name


def _coerce(opt: Option, value: Any, where: str) -> Any:
    if value is None:
        return None
    k = opt.kind
    try:
        if k in ("str", "path"):
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError
            return os.fspath(value)
        if k == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if k == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if k == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
                return False
            raise TypeError
        if k == "choice":
            value = str(value)
            if value not in opt.choices:
                raise UsageError(f"{where}{opt.name} must be one of {', '.join(opt.choices)}, "
                                 f"got {value!r}")
            return value
        if k == "params":
            if not isinstance(value, Mapping):
                raise TypeError
            return {str(a): b for a, b in value.items()}
    except (TypeError, ValueError):
        raise UsageError(f"{where}{opt.name} must be {_KIND_WORDS[k]}, got {value!r}") from None
    raise AssertionError(k)


_KIND_WORDS = {"str": "a string", "path": "a path", "int": "an integer", "float": "a number",
               "bool": "true or false", "choice": "one of the choices",
               "params": "a mapping of parameter names to values"}


def check_keys(mapping: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Keys normalised (dashes to underscores); unknown keys raise UsageError."""
    import difflib
    out, unknown = {}, []
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in _BY_NAME:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        out[name] = value
    if unknown:
        raise UsageError(f"{where}unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; known: {', '.join(sorted(_BY_NAME))}")
    return out


def settings_from(values: Mapping[str, Any], *, base_dir: Optional[str] = None,
                  where: str = "") -> Dict[str, Any]:
    """The settings in ``values`` (a YAML mapping, flags or a stored config), typed and
    checked, paths made absolute (relative ones against ``base_dir``, default the
    working directory). Unknown keys and bad values raise UsageError; ``where``
    prefixes the messages (e.g. the YAML file's name)."""
    out = {}
    for name, value in check_keys(values, where).items():
        value = _coerce(_BY_NAME[name], value, where)
        if name in _PATH_KEYS + ("run_dir",) and value is not None:
            value = os.path.expanduser(value)
            if not os.path.isabs(value):
                value = os.path.join(base_dir or os.getcwd(), value)
            value = os.path.normpath(value)
        out[name] = value
    return out


def normalize_config(values: Mapping[str, Any], *, base_dir: Optional[str] = None,
                     where: str = "") -> Dict[str, Any]:
    """Every setting: `DEFAULTS` updated with `settings_from` ``values``, with the
    checks that involve several settings; rule names made canonical.

    Raises UsageError on a bad value.
    """
    cfg = dict(DEFAULTS)
    cfg.update(settings_from(values, base_dir=base_dir, where=where))
    for name in ("run_dir",):
        if cfg[name] is not None and not os.path.isabs(cfg[name]):
            cfg[name] = os.path.normpath(os.path.join(base_dir or os.getcwd(), cfg[name]))
    for name in ("batch_size", "grad_accum", "steps", "eval_steps", "max_new_tokens",
                 "eval_batch_size"):
        if cfg[name] < 1:
            raise UsageError(f"{where}{name} must be >= 1, got {cfg[name]}")
    for name in ("eval_subset", "warmup_steps"):
        if cfg[name] < 0:
            raise UsageError(f"{where}{name} must be >= 0, got {cfg[name]}")
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise UsageError(f"{where}threads must be >= 1, got {cfg['threads']}")
    if cfg["max_length"] is not None and cfg["max_length"] < 2:
        raise UsageError(f"{where}max_length must be >= 2, got {cfg['max_length']}")
    if not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise UsageError(f"{where}lr must be a positive number, got {cfg['lr']}")
    if cfg["weight_decay"] < 0:
        raise UsageError(f"{where}weight_decay must be >= 0, got {cfg['weight_decay']}")
    cfg["rule"] = canonical_rule(cfg["rule"]) or "none"
    cfg["baseline"] = canonical_rule(cfg["baseline"], "baseline rule") or "none"
    if cfg["baseline"] == "forced":
        raise UsageError(f"{where}baseline 'forced' marks tokens for diffusion-LM training, not a "
                         "loss mask; choose a loss-mask rule")
    cfg["rule_params"] = dict(cfg["rule_params"] or {})
    cfg["baseline_params"] = dict(cfg["baseline_params"] or {})
    return cfg


def rule_params(cfg: Mapping[str, Any], which: str = "rule",
                budget: Optional[int] = None) -> Dict[str, Any]:
    """The parameters `t3s.selection.apply_rule` gets for ``cfg[which]``.

    ``random`` draws with ``seed`` = the run's seed, and keeps by default as
    many tokens as the main rule keeps (``budget``) *(choice)*.
    """
    rule = cfg[which]
    params = dict(cfg["rule_params"] if which == "rule" else cfg["baseline_params"])
    if rule == "random":
        params.setdefault("seed", cfg["seed"])
        if not any(k in params for k in ("keep_fraction", "budget", "like")):
            if budget is not None:
                params["budget"] = int(budget)
            elif which == "rule":
                params["keep_fraction"] = 0.5
    return params


def check_rule_params(cfg: Mapping[str, Any]) -> None:
    """Apply the rule and the baseline to a small made-up table, so that bad
    parameters fail before hours of training rather than after."""
    import numpy as np

    from .data import TokenTable
    from .selection import apply_rule
    n = 8
    t = TokenTable(np.zeros(n, np.int64), np.arange(1, n + 1, dtype=np.int32),
                   delta=np.linspace(-1, 1, n, dtype=np.float32),
                   c0=np.linspace(-3, -0.1, n, dtype=np.float32),
                   cb=np.linspace(-2, -0.2, n, dtype=np.float32),
                   loss_theta=np.linspace(0.1, 3, n, dtype=np.float32),
                   loss_ref=np.linspace(0.2, 2, n, dtype=np.float32))
    for which in ("rule", "baseline"):
        rule = cfg[which]
        if rule == "none":
            if which == "rule" and cfg["rule_params"]:
                raise UsageError("rule_params given but rule is 'none'")
            if which == "baseline" and cfg["baseline_params"]:
                raise UsageError("baseline_params given but baseline is 'none'")
            continue
        params = rule_params(cfg, which, budget=n // 2)
        if isinstance(params.get("like"), str):
            params["like"] = canonical_rule(params["like"], "rule in like=")
        try:
            apply_rule(rule, t, **params)
        except UsageError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            flag = "--rule-param" if which == "rule" else "--baseline-param"
            raise UsageError(f"{_first_line(e)} (given: {params}; set parameters with "
                             f"{flag} KEY=VALUE)") from None


# --------------------------------------------------------------------------------------
# Fingerprints and hashes
# --------------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: Optional[str]) -> Optional[str]:
    """sha256 identifying a data file (its content) or a model directory (its
    top-level files' names and sizes, and the content of those under 64 MiB).
    None for None or a path that does not exist."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return _sha256_file(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        if size <= _HASH_CONTENT_LIMIT:
            h.update(_sha256_file(full).encode())
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()


def identity(cfg: Mapping[str, Any], fingerprints: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """The hashed settings: paths replaced by the fingerprints of what they name
    (a tokenizer left at the model's counts as the model)."""
    out = {}
    for o in OPTIONS:
        if not o.hashed:
            continue
        if o.kind == "path":
            out[o.name] = None if cfg.get(o.name) is None else {"sha256": fingerprints.get(o.name)}
        else:
            out[o.name] = cfg.get(o.name)
    return out


def _describe(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        return f"{key} (contents differ)"
    return f"{key} ({old!r} -> {new!r})"


# --------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class RunDir:
    """A run directory: settings, ledger, stage directories and a lock."""

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        self._lock_fh = None

    # -- paths -------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def partial_dir(self, name: str) -> Path:
        return self.path / f"{PARTIAL_PREFIX}{name}"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER_FILE

    def is_run_dir(self) -> bool:
        return self.config_path.is_file()

    # -- settings ----------------------------------------------------------------------
    def load_config(self) -> Optional[Dict[str, Any]]:
        """The stored ``config.json`` (None when there is none)."""
        if not self.is_run_dir():
            return None
        try:
            data = _read_json(self.config_path)
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.config_path} cannot be read ({e}); pass --overwrite to "
                              "start this run afresh") from None
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise RunDirError(f"{self.config_path} is not a t3s run configuration")
        return data

    def write_config(self, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> None:
        ident = identity(cfg, fingerprints)
        _write_json(self.config_path, {
            "format": RUN_FORMAT, "version": VERSION, "hash": _sha(ident),
            "config": dict(cfg), "fingerprints": dict(fingerprints), "identity": ident,
            "written": _now()})

    def config_diff(self, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> List[str]:
        """The hashed settings that differ from the stored ones, described."""
        stored = self.load_config()
        if stored is None:
            return []
        old = stored.get("identity") or {}
        new = identity(cfg, fingerprints)
        return [_describe(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                if _canonical(old.get(k)) != _canonical(new.get(k))]

    # -- lifecycle ---------------------------------------------------------------------
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def wipe(self) -> None:
        """Delete everything in the directory (it must be a run directory or empty)."""
        if not self.path.exists():
            return
        if not self.is_run_dir() and any(self.path.iterdir()):
            raise RunDirError(f"{self.path} is not a t3s run directory (no {CONFIG_FILE}); "
                              "refusing to delete it: choose another --run-dir")
        for child in self.path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the directory (RunDirError when another process has it)."""
        self.create()
        fh = open(self.path / LOCK_FILE, "a+")
        try:
            try:
                import fcntl
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            except OSError:
                raise RunDirError(f"another t3s process is working in {self.path}") from None
            yield self
        finally:
            fh.close()

    # -- ledger ------------------------------------------------------------------------
    def ledger(self) -> Dict[str, Dict[str, Any]]:
        """stage name -> record of every finished stage, reconciled with the disk:
        an entry whose directory is gone is dropped; a stage directory with a
        record but no entry (killed between the rename and the ledger write) is
        adopted."""
        entries: Dict[str, Dict[str, Any]] = {}
        if self.ledger_path.is_file():
            try:
                data = _read_json(self.ledger_path)
                entries = dict(data.get("stages", {}))
            except (OSError, ValueError, AttributeError):
                logger.warning("t3s: %s is unreadable; rebuilding it from the stage records",
                               self.ledger_path)
        changed = False
        for name in list(entries):
            if not (self.stage_dir(name) / RECORD_FILE).is_file():
                del entries[name]
                changed = True
        for st in _registry():
            rec_path = self.stage_dir(st.name) / RECORD_FILE
            if st.name not in entries and rec_path.is_file():
                try:
                    entries[st.name] = _read_json(rec_path)
                    changed = True
                except (OSError, ValueError):
                    pass
        if changed and self.path.is_dir():
            self._write_ledger(entries)
        return entries

    def _write_ledger(self, entries: Mapping[str, Any]) -> None:
        _write_json(self.ledger_path, {"format": LEDGER_FORMAT, "version": VERSION,
                                       "stages": {k: entries[k] for k in _ordered(entries)}})

    def record(self, name: str) -> Optional[Dict[str, Any]]:
        return self.ledger().get(name)

    def invalidate(self, name: str) -> None:
        """Forget a finished stage and delete its directory (before it is redone)."""
        entries = self.ledger()
        entries.pop(name, None)
        self._write_ledger(entries)
        d = self.stage_dir(name)
        if d.exists():
            shutil.rmtree(d)

    def commit(self, name: str, record: Dict[str, Any]) -> None:
        """Finish a stage: record written last into its partial directory, the
        directory renamed into place, then the ledger updated."""
        partial, final = self.partial_dir(name), self.stage_dir(name)
        _write_json(partial / RECORD_FILE, record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        entries = self.ledger()
        entries[name] = record
        self._write_ledger(entries)


def _ordered(names) -> List[str]:
    order = {s.name: i for i, s in enumerate(_registry())}
    return sorted(names, key=lambda n: order.get(n, len(order)))


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------

@dataclass
class Stage:
    """A step of a run.

    keys: settings it depends on; deps: stages whose outputs it needs (they
    must be current); optional: stages whose outputs it uses when they are
    current (their run ids are recorded too, so a later change reruns it).
    enabled: whether ``t3s run`` runs it under the settings.
    """

    name: str
    fn: Callable[["StageContext"], Dict[str, Any]]
    keys: Tuple[str, ...]
    deps: Callable[[Mapping[str, Any]], Tuple[str, ...]]
    optional: Tuple[str, ...] = ()
    enabled: Callable[[Mapping[str, Any]], bool] = lambda cfg: True
    help: str = ""


@dataclass
class StageContext:
    """What a stage function gets: the settings, its working directory (the
    partial one) and the directories of the current stages it may read."""

    name: str
    cfg: Dict[str, Any]
    work: Path
    run: RunDir
    inputs: Dict[str, Optional[str]]
    say: Callable[[str], None]
    fingerprints: Dict[str, Any] = field(default_factory=dict)

    def dir(self, stage: str) -> Optional[Path]:
        """The directory of a stage this one consumed (None when it was not current)."""
        return self.run.stage_dir(stage) if self.inputs.get(stage) else None

    def record(self, stage: str) -> Optional[Dict[str, Any]]:
        return self.run.record(stage) if self.inputs.get(stage) else None


def stage_hash(stage: Stage, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> str:
    ident = identity(cfg, fingerprints)
    return _sha({k: ident.get(k, cfg.get(k)) for k in stage.keys})


def stage_status(run: RunDir, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any],
                 *, redo: Sequence[str] = ()) -> Dict[str, Tuple[Optional[str], str]]:
    """stage name -> (run_id when current else None, a reason when not current)."""
    entries = run.ledger()
    status: Dict[str, Tuple[Optional[str], str]] = {}
    for st in _registry():
        rec = entries.get(st.name)
        if not st.enabled(cfg):
            status[st.name] = (None, "disabled by the settings")
        elif st.name in redo:
            status[st.name] = (None, "asked to redo")
        elif rec is None:
            status[st.name] = (None, "not run yet")
        elif rec.get("hash") != stage_hash(st, cfg, fingerprints):
            status[st.name] = (None, "its settings changed")
        else:
            expected = _inputs(st, cfg, status)
            if any(expected.get(d) is None for d in st.deps(cfg)):
                status[st.name] = (None, "a stage it needs is not current")
            elif rec.get("inputs") != expected:
                status[st.name] = (None, "a stage it consumed was redone")
            else:
                status[st.name] = (rec.get("run_id"), "done")
    return status


def _inputs(st: Stage, cfg, status) -> Dict[str, Optional[str]]:
    names = list(st.deps(cfg)) + [n for n in st.optional if n not in st.deps(cfg)]
    return {n: status.get(n, (None, ""))[0] for n in names}


def run_stages(run: RunDir, cfg: Dict[str, Any], fingerprints: Dict[str, Any],
               targets: Sequence[str], *, redo: Sequence[str] = (),
               say: Callable[[str], None] = print, explicit: bool = False) -> Dict[str, str]:
    """Run the ``targets`` (in pipeline order) that are not current.

    explicit: the targets were asked for by name (``t3s train``): a target
    whose required stages are not current raises RunDirError saying which to
    run first, and one that is already current is reported as such. Under
    ``t3s run`` (not explicit) disabled stages are skipped.

    Returns stage name -> what happened ("ran", "done before", "skipped").
    """
    outcome: Dict[str, str] = {}
    redo = list(redo)
    for st in _registry():
        if st.name not in targets:
            continue
        status = stage_status(run, cfg, fingerprints, redo=redo)
        run_id, reason = status[st.name]
        if not st.enabled(cfg):
            if explicit:
                raise RunDirError(f"stage {st.name!r} is disabled by the settings "
                                  f"({'baseline is none' if st.name == 'baseline' else reason})")
            outcome[st.name] = "skipped"
            continue
        if run_id is not None:
            rec = run.record(st.name) or {}
            say(f"[{st.name}] already done ({rec.get('finished', '?')}); "
                f"pass --redo {st.name} to run it again")
            outcome[st.name] = "done before"
            continue
        missing = [d for d in st.deps(cfg) if status[d][0] is None]
        if missing:
            d = missing[0]
            why = status[d][1]
            raise RunDirError(f"stage {st.name!r} needs stage {d!r}, which is {why} in "
                              f"{run.path}; run `t3s {d}` (or `t3s run`) first")
        inputs = _inputs(st, cfg, status)
        _run_one(run, st, cfg, fingerprints, inputs, say, reason)
        if st.name in redo:
            redo.remove(st.name)
        outcome[st.name] = "ran"
    return outcome


def _run_one(run: RunDir, st: Stage, cfg, fingerprints, inputs, say, reason: str) -> None:
    partial = run.partial_dir(st.name)
    if partial.exists():
        say(f"[{st.name}] removing the unfinished attempt left by an interrupted run")
        shutil.rmtree(partial)
    if run.stage_dir(st.name).exists():
        run.invalidate(st.name)  # stale or asked to redo: its outputs are replaced
    partial.mkdir(parents=True)
    say(f"[{st.name}] running ({reason})")
    t0 = time.perf_counter()
    started = _now()
    ctx = StageContext(st.name, dict(cfg), partial, run, dict(inputs), say, dict(fingerprints))
    summary = st.fn(ctx) or {}
    seconds = time.perf_counter() - t0
    record = {"stage": st.name, "run_id": uuid.uuid4().hex,
              "hash": stage_hash(st, cfg, fingerprints), "inputs": dict(inputs),
              "started": started, "finished": _now(), "seconds": round(seconds, 3),
              "summary": summary}
    run.commit(st.name, record)
    say(f"[{st.name}] done in {seconds:.1f} s")


# --------------------------------------------------------------------------------------
# Loading models and data (errors a user can fix are UsageError)
# --------------------------------------------------------------------------------------

_DATA_WHAT = {"train": "training data", "heldout": "held-out data", "test": "test data",
              "extra_test": "extra test data"}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(cfg: Mapping[str, Any]) -> str:
    """"cpu" or "cuda" ("auto": CUDA when available)."""
    import torch
    device = cfg["device"]
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return device


def check_model_dir(path: Optional[str], *, trust_remote_code: bool, what: str = "model") -> None:
    """A local Hugging Face model (or tokenizer) directory that loads without
    custom code unless ``trust_remote_code``; UsageError otherwise."""
    if path is None:
        raise UsageError(f"no {what} given: pass --{what} /path/to/hf_model (a local Hugging Face "
                         f"directory) or set '{what}' in the config file")
    if not os.path.exists(path):
        raise UsageError(f"{what} path {path} does not exist (t3s loads models from a local "
                         "directory; download the model first)")
    if not os.path.isdir(path):
        raise UsageError(f"{what} path {path} is not a directory (expected a Hugging Face model "
                         "directory with config.json)")
    if what == "model" and not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{path} has no config.json: not a Hugging Face model directory")
    for fname in ("config.json", "tokenizer_config.json"):
        full = os.path.join(path, fname)
        if not os.path.isfile(full):
            continue
        try:
            data = _read_json(Path(full))
        except ValueError as e:
            raise UsageError(f"{full} is not valid JSON ({e})") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map and not trust_remote_code:
            names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
            raise UsageError(f"{what} {path} needs its own Python code ({fname} has auto_map: "
                             f"{names}); pass --trust-remote-code if you trust that code")


def load_tokenizer(cfg: Mapping[str, Any]):
    """The run's tokenizer; a missing pad token is set to the eos token."""
    from transformers import AutoTokenizer
    path = cfg["tokenizer"] or cfg["model"]
    check_model_dir(path, trust_remote_code=cfg["trust_remote_code"],
                    what="tokenizer" if cfg["tokenizer"] else "model")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg["trust_remote_code"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a tokenizer from {path}: {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, cfg: Mapping[str, Any], *, device: Optional[str] = None):
    """A causal LM from a local directory in the run's dtype (moved to ``device`` if given)."""
    import torch
    from transformers import AutoModelForCausalLM
    check_model_dir(path, trust_remote_code=cfg["trust_remote_code"])
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, _DTYPES[cfg["dtype"]]),
            trust_remote_code=cfg["trust_remote_code"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load a causal LM from {path}: {_first_line(e)}") from None
    if device is not None:
        model.to(device)
    return model


def load_data(cfg: Mapping[str, Any], key: str, tok, *, required: bool = True):
    """`t3s.TraceDataset` of the JSONL file in setting ``key``; None when unset and
    not required. Bad lines, a missing file and an empty file are UsageErrors."""
    from .data import TraceDataset
    what = _DATA_WHAT[key]
    path = cfg[key]
    if path is None:
        if required:
            raise UsageError(f"no {what} given: pass --{key} FILE.jsonl or set '{key}' in the "
                             "config file")
        return None
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} not found")
    try:
        with warnings_as_log():
            ds = TraceDataset.from_jsonl(path, tok, max_length=cfg["max_length"],
                                         truncation=cfg["truncation"])
    except UnicodeDecodeError as e:
        raise UsageError(f"bad {what}: {path} is not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise UsageError(f"bad {what}: {_first_line(e)}") from None
    if len(ds) == 0:
        extra = (f" ({len(ds.dropped)} dropped as longer than max_length={cfg['max_length']})"
                 if ds.dropped else "")
        raise UsageError(f"{what} {path} holds no examples{extra}")
    return ds


@contextlib.contextmanager
def warnings_as_log():
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.warning("%s", w.message)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# --------------------------------------------------------------------------------------
# The stages themselves live in t3s.stages (imported lazily: they import this module)
# --------------------------------------------------------------------------------------

_FROM_STAGES = ("STAGES", "STAGE_NAMES", "NEEDS_MODEL", "NEEDS_TRAIN", "ARMS", "eval_sets")


def _registry():
    from .stages import STAGES
    return STAGES


def __getattr__(name: str) -> Any:
    if name in _FROM_STAGES:
        from . import stages
        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
