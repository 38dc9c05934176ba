"""The run directory: every file name in it, its settings, its ledger and its lock.

Every name a run directory uses is defined here, and only here; the stages,
the report and the demo build their paths from these constants::

    RUN_DIR/
      config.json          CONFIG_FILE: the settings, the fingerprints of the files they
                           name, a hash
      stages.json          LEDGER_FILE: one entry per finished stage
      .lock                LOCK_FILE: held while a process works in the directory
      pilot/   stage.json (RECORD_FILE), trajectory/ (TRAJECTORY_DIR),
               t3s_accuracy.json (ACCURACY_FILE), log_history.json (LOG_HISTORY_FILE),
               checkpoint-<b>/ (θb, `checkpoint_dir`; every evaluated step with
               ``keep_checkpoints``), final/ (FINAL_MODEL_DIR: the SFT model)
      select/  stage.json, selection.parquet (SELECTION_FILE), baseline.parquet
               (BASELINE_FILE), arm_<name>.parquet (each of ``arms``: `arm_file`),
               delta_online.parquet, delta_exact.parquet (`delta_file`),
               profile/ (PROFILE_DIR), summary.json (SUMMARY_FILE)
      train/   stage.json, model/ (MODEL_DIR), t3s_accuracy.json, log_history.json,
               checkpoint-<step>/ (with ``keep_checkpoints``)
      baseline/  (as train/)
      arms/    stage.json, <name>/ per arm of ``arms`` (as train/, plus summary.json,
               SUMMARY_FILE, written last: the arm is finished)
      eval/    stage.json, results.json (RESULTS_FILE), <arm>.jsonl (every prediction on
               the first set), <arm>.<set>.jsonl (on the others; `predictions_file`)
      analyze/ stage.json, analysis.json (ANALYSIS_FILE), analysis.md (ANALYSIS_SECTION: the
               report's section), the figures of ANALYSIS_FIGURES
      sensitivity/  stage.json, sensitivity.json (SENSITIVITY_FILE), sensitivity.md
               (SENSITIVITY_SECTION), sensitivity.png (SENSITIVITY_FIGURE), step-<s>/
               (`sensitivity_dir`) per step trained: selection.parquet, retrain/
               (SENSITIVITY_RETRAIN_DIR, as train/), t3s.jsonl predictions, result.json
               (SENSITIVITY_RESULT, written last: the step is finished)
      report/  stage.json, report.md (REPORT_FILE), metrics.json (METRICS_FILE),
               shock.png (SHOCK_FIGURE), delta_hist.png (DELTA_FIGURE),
               traces.png (TRACES_FIGURE)
      .partial-<stage>/    PARTIAL_PREFIX: a stage at work
      data/    DEMO_DATA_DIR (`t3s demo` only): train.jsonl, heldout.jsonl, four_terms.jsonl
               (DEMO_DATA_FILES); .data-*/ (DEMO_STAGING_PREFIX) while they are written

`STAGE_NAMES` are the stage directories, in the order ``t3s run`` runs them
(the stages themselves are in `t3s.pipeline.stages`).

`RunDir` reads and writes the settings (``config.json``), the ledger (written
to a temporary file, then renamed) and the lock. `RunDir.commit` finishes a
stage: its record is written last into its partial directory, the directory
is renamed into place and the ledger updated; `RunDir.ledger` reconciles the
ledger with the disk (an entry whose directory is gone is dropped, a stage
directory with a record but no entry is adopted).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .._util import canonical_json, sha256_json
from .settings import UsageError, describe_change, identity, normalize_config

__all__ = [
    "ATTEMPT_FILE",
    "RunDir",
    "RunDirError",
    "STAGE_NAMES",
    "CONFIG_FILE",
    "LEDGER_FILE",
    "RECORD_FILE",
    "LOCK_FILE",
    "PARTIAL_PREFIX",
    "TRAJECTORY_DIR",
    "ACCURACY_FILE",
    "LOG_HISTORY_FILE",
    "FINAL_MODEL_DIR",
    "MODEL_DIR",
    "CHECKPOINT_PREFIX",
    "checkpoint_dir",
    "SELECTION_FILE",
    "BASELINE_FILE",
    "arm_file",
    "delta_file",
    "PROFILE_DIR",
    "SUMMARY_FILE",
    "RESULTS_FILE",
    "ANALYSIS_FILE",
    "ANALYSIS_SECTION",
    "ANALYSIS_FIGURES",
    "SENSITIVITY_FILE",
    "SENSITIVITY_SECTION",
    "SENSITIVITY_FIGURE",
    "SENSITIVITY_RESULT",
    "SENSITIVITY_RETRAIN_DIR",
    "sensitivity_dir",
    "predictions_file",
    "REPORT_FILE",
    "METRICS_FILE",
    "SHOCK_FIGURE",
    "DELTA_FIGURE",
    "TRACES_FIGURE",
    "DEMO_DATA_DIR",
    "DEMO_DATA_FILES",
    "DEMO_STAGING_PREFIX",
    "read_json",
    "write_json",
    "now",
]

logger = logging.getLogger(__name__)

#: the stage directories, in pipeline order
STAGE_NAMES = ("pilot", "select", "train", "baseline", "arms", "eval", "analyze", "sensitivity",
               "report")

# the run directory itself
CONFIG_FILE = "config.json"
LEDGER_FILE = "stages.json"
LOCK_FILE = ".lock"
PARTIAL_PREFIX = ".partial-"
# in every stage directory
RECORD_FILE = "stage.json"
ATTEMPT_FILE = "attempt.json"         # .partial-<stage>/: the settings hash and inputs it runs under
# pilot/, train/, baseline/
TRAJECTORY_DIR = "trajectory"
ACCURACY_FILE = "t3s_accuracy.json"   # written by `t3s.trainer.AccuracyCallback` under this name
LOG_HISTORY_FILE = "log_history.json"
FINAL_MODEL_DIR = "final"             # pilot/: the plain-SFT model
MODEL_DIR = "model"                   # train/, baseline/: the retrained model
CHECKPOINT_PREFIX = "checkpoint-"     # pilot/checkpoint-<b>: θb
# select/
SELECTION_FILE = "selection.parquet"
BASELINE_FILE = "baseline.parquet"
PROFILE_DIR = "profile"
SUMMARY_FILE = "summary.json"
# eval/
RESULTS_FILE = "results.json"
# analyze/
ANALYSIS_FILE = "analysis.json"
ANALYSIS_SECTION = "analysis.md"
ANALYSIS_FIGURES = {"shock": "analysis_shock.png", "transfer": "analysis_transfer.png",
                    "gradients": "analysis_gradients.png", "static": "analysis_static_roc.png"}
# sensitivity/
SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_SECTION = "sensitivity.md"
SENSITIVITY_FIGURE = "sensitivity.png"
SENSITIVITY_RESULT = "result.json"      # step-<s>/: written last
SENSITIVITY_RETRAIN_DIR = "retrain"     # step-<s>/: the retraining's output directory
# report/
REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
SHOCK_FIGURE = "shock.png"
DELTA_FIGURE = "delta_hist.png"
TRACES_FIGURE = "traces.png"
# a `t3s demo` run directory also holds its data: data/<DEMO_DATA_FILES[key]>, written
# in a DEMO_STAGING_PREFIX folder first
DEMO_DATA_DIR = "data"
DEMO_DATA_FILES = {"train": "train.jsonl", "heldout": "heldout.jsonl",
                   "extra_test": "four_terms.jsonl"}
DEMO_STAGING_PREFIX = ".data-"

RUN_FORMAT = "t3s.run"
LEDGER_FORMAT = "t3s.stages"
VERSION = 1


def checkpoint_dir(step: int) -> str:
    """The name of a Trainer checkpoint directory (``checkpoint-<step>``)."""
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def delta_file(source: str) -> str:
    """select/'s Δc table of ``source`` ("online" or "exact")."""
    return f"delta_{source}.parquet"


def arm_file(name: str) -> str:
    """select/'s mask artifact of the arm ``name`` (one of the ``arms`` setting)."""
    return f"arm_{name}.parquet"


def sensitivity_dir(step: int) -> str:
    """sensitivity/'s directory of the retraining from the mask at pilot step ``step``."""
    return f"step-{int(step)}"


def predictions_file(arm: str, set_key: Optional[str] = None) -> str:
    """eval/'s predictions of ``arm``: ``<arm>.jsonl`` on the primary set (``set_key``
    None), ``<arm>.<set_key>.jsonl`` on the others."""
    return f"{arm}.jsonl" if set_key is None else f"{arm}.{set_key}.jsonl"


class RunDirError(UsageError):
    """The run directory cannot be used as asked (other settings, missing stages, locked)."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second (stage records, config.json)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file, fsynced, then renamed)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk or an interrupt leaves no half-written temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> Any:
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
            data = read_json(self.config_path)
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.config_path} cannot be read ({e}); pass --overwrite to "
                              "start this run afresh") from None
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise RunDirError(f"{self.config_path} is not a t3s run configuration")
        return data

    def write_config(self, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> None:
        ident = identity(cfg, fingerprints)
        write_json(self.config_path, {
            "format": RUN_FORMAT, "version": VERSION, "hash": sha256_json(ident),
            "config": dict(cfg), "fingerprints": dict(fingerprints), "identity": ident,
            "written": now()})

    def config_diff(self, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> List[str]:
        """The hashed settings that differ from the stored ones, described. A setting the
        stored identity lacks (the run was made before the setting existed) counts as
        its default, under which the run was made."""
        stored = self.load_config()
        if stored is None:
            return []
        new = identity(cfg, fingerprints)
        old = {**identity(normalize_config({}), {}), **(stored.get("identity") or {})}
        return [describe_change(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                if canonical_json(old.get(k)) != canonical_json(new.get(k))]

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
        """Hold an exclusive lock on the directory (RunDirError when another process, or
        another `locked` in this one, has it). `filelock` locks on every platform (flock
        on POSIX, msvcrt on Windows): no platform leaves a run directory unlocked. The
        OS drops the lock when its holder dies, so a killed run never leaves it held."""
        from filelock import FileLock, Timeout
        self.create()
        # a new lock object per call (not a shared, reentrant one): a second `locked` on
        # the same directory must be refused like another process
        lock = FileLock(str(self.path / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunDirError(f"another t3s process is working in {self.path}") from None
        try:
            yield self
        finally:
            lock.release()

    # -- ledger ------------------------------------------------------------------------
    def ledger(self) -> Dict[str, Dict[str, Any]]:
        """stage name -> record of every finished stage, reconciled with the disk:
        an entry whose directory is gone is dropped; a stage directory with a
        record but no entry (killed between the rename and the ledger write) is
        adopted."""
        entries: Dict[str, Dict[str, Any]] = {}
        if self.ledger_path.is_file():
            try:
                data = read_json(self.ledger_path)
                entries = dict(data.get("stages", {}))
            except (OSError, ValueError, AttributeError):
                logger.warning("t3s: %s is unreadable; rebuilding it from the stage records",
                               self.ledger_path)
        changed = False
        for name in list(entries):
            if not (self.stage_dir(name) / RECORD_FILE).is_file():
                del entries[name]
                changed = True
        for name in STAGE_NAMES:
            rec_path = self.stage_dir(name) / RECORD_FILE
            if name not in entries and rec_path.is_file():
                try:
                    entries[name] = read_json(rec_path)
                    changed = True
                except (OSError, ValueError):
                    pass
        if changed and self.path.is_dir():
            self._write_ledger(entries)
        return entries

    def _write_ledger(self, entries: Mapping[str, Any]) -> None:
        write_json(self.ledger_path, {"format": LEDGER_FORMAT, "version": VERSION,
                                       "stages": {k: entries[k] for k in _ordered(entries)}})

    def finished_record(self, name: str) -> Optional[Dict[str, Any]]:
        """The ledger's record of finished stage ``name`` (None when it has not finished)."""
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
        write_json(partial / RECORD_FILE, record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        entries = self.ledger()
        entries[name] = record
        self._write_ledger(entries)


def _ordered(names) -> List[str]:
    order = {name: i for i, name in enumerate(STAGE_NAMES)}
    return sorted(names, key=lambda n: order.get(n, len(order)))
