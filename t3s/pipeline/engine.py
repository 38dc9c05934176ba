"""The stage machinery: what a stage is, when it is current, running stages resumably.

A run is a sequence of `Stage` s, each a function of the settings and of the
outputs of the stages before it (the stages themselves, and the table of what
each does, are in `t3s.pipeline.stages`; they register themselves here with
`register_stages`, so this module never imports them).

Resuming. A stage works in ``.partial-<stage>/``; when its function returns,
its record (``stage.json``) is written last, the directory is renamed to
``<stage>/`` and the ledger is updated (`t3s.pipeline.rundir.RunDir.commit`).
A stage is *current* when the ledger has it, its directory exists, the
settings it depends on (`Stage.keys`) hash to the recorded value and the
stages it consumed are the current ones it recorded (by ``run_id``). Running
again skips current stages, so a second ``t3s run`` does nothing. A
``.partial-*`` directory left by a killed run is removed and its stage
started again, unless the stage is `Stage.resumable` and the attempt was
made under the same settings and inputs (``attempt.json``): then it keeps
the directory and resumes (the training stages continue from their last
complete checkpoint, `t3s.pipeline.training.resume_point`). A stage renamed
into place whose ledger entry was not yet written is adopted from its
``stage.json``. ``redo`` re-runs the named
stages; the stages that consumed their outputs then are no longer current and
run again too, and nothing upstream is touched.

Under a launcher (``torchrun``, ``accelerate launch``: `t3s.dist`) every rank
runs `run_stages` together. Rank 0 owns the run directory: it decides what
each stage does (the ledger, the statuses, an attempt to resume), prepares
and commits the stage directory, and prints; the other ranks follow its
decisions. A stage's function runs on every rank (`Stage.ranks` "all": the
training stages, the split profiling and generation) or on rank 0 alone
("main": the others wait). An interrupted attempt is resumed only under the
same number of ranks (it records ``world_size``).
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from .. import dist
from .._util import sha256_json
from .rundir import ATTEMPT_FILE, STAGE_NAMES, RunDir, RunDirError, now, read_json, write_json
from .settings import DEFAULTS, HASHED_ONLY_OFF_DEFAULT, identity

__all__ = ["Stage", "StageContext", "register_stages", "registered_stages", "stage_hash",
           "stage_status", "run_stages"]

_REGISTRY: Tuple["Stage", ...] = ()


def register_stages(stages: Sequence["Stage"]) -> None:
    """Make ``stages`` the pipeline `stage_status` and `run_stages` use by default
    (`t3s.pipeline.stages` registers its `STAGES` when imported). Their names
    must be the run directory's `STAGE_NAMES`, in that order."""
    global _REGISTRY
    names = tuple(s.name for s in stages)
    if names != STAGE_NAMES:
        raise ValueError(f"stages {names} are not the run directory's {STAGE_NAMES}")
    _REGISTRY = tuple(stages)


def registered_stages() -> Tuple["Stage", ...]:
    """The registered stages (`register_stages`); RuntimeError when there are none."""
    if not _REGISTRY:
        raise RuntimeError("no stages registered: import t3s.pipeline.stages first")
    return _REGISTRY


@dataclass
class Stage:
    """A step of a run.

    keys: settings it depends on; deps: stages whose outputs it needs (they
    must be current); optional: stages whose outputs it uses when they are
    current (their run ids are recorded too, so a later change reruns it).
    enabled: whether ``t3s run`` runs it under the settings.
    resumable: an interrupted attempt under the same settings and inputs is
        continued in its directory (`StageContext.resume`) instead of removed.
    ranks: under a launcher, "all" runs ``fn`` on every rank (it must then do
        its file work on rank 0, `t3s.dist.is_main`), "main" on rank 0 only.
    check: what only the earlier stages' outputs can tell, run on rank 0 before the
        stage's previous outputs are replaced, so that a refusal leaves them in place.
    """

    name: str
    fn: Callable[["StageContext"], Dict[str, Any]]
    keys: Tuple[str, ...]
    deps: Callable[[Mapping[str, Any]], Tuple[str, ...]]
    optional: Tuple[str, ...] = ()
    enabled: Callable[[Mapping[str, Any]], bool] = lambda cfg: True
    help: str = ""
    resumable: bool = False
    ranks: str = "all"
    check: Optional[Callable[["StageContext"], None]] = None

    def __post_init__(self):
        if self.ranks not in ("all", "main"):
            raise ValueError(f"stage {self.name!r}: ranks must be 'all' or 'main', "
                             f"not {self.ranks!r}")


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
    #: True when ``work`` holds an interrupted attempt of this stage to continue
    resume: bool = False

    def dir(self, stage: str) -> Optional[Path]:
        """The directory of a stage this one consumed (None when it was not current)."""
        return self.run.stage_dir(stage) if self.inputs.get(stage) else None

    def input_record(self, stage: str) -> Optional[Dict[str, Any]]:
        """The finished record of a stage this one consumed (None when it was not current)."""
        return self.run.finished_record(stage) if self.inputs.get(stage) else None


def stage_hash(stage: Stage, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> str:
    ident = identity(cfg, fingerprints)
    values = {k: ident.get(k, cfg.get(k)) for k in stage.keys}
    return sha256_json({k: v for k, v in values.items()
                        if not (k in HASHED_ONLY_OFF_DEFAULT and v == DEFAULTS[k])})


def stage_status(run: RunDir, cfg: Mapping[str, Any], fingerprints: Mapping[str, Any],
                 *, redo: Sequence[str] = (), stages: Optional[Sequence[Stage]] = None,
                 ) -> Dict[str, Tuple[Optional[str], str]]:
    """stage name -> (run_id when current else None, a reason when not current).

    stages: the pipeline (default: `registered_stages`)."""
    entries = run.ledger()
    status: Dict[str, Tuple[Optional[str], str]] = {}
    for st in stages if stages is not None else registered_stages():
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
               say: Callable[[str], None] = print, explicit: bool = False,
               stages: Optional[Sequence[Stage]] = None) -> Dict[str, str]:
    """Run the ``targets`` (in pipeline order) that are not current.

    explicit: the targets were asked for by name (``t3s train``): a target
    whose required stages are not current raises RunDirError saying which to
    run first, and one that is already current is reported as such. Under
    ``t3s run`` (not explicit) disabled stages are skipped.

    stages: the pipeline (default: `registered_stages`).

    Returns stage name -> what happened ("ran", "done before", "skipped").
    """
    stages = tuple(stages if stages is not None else registered_stages())
    say = dist.main_only(say)  # rank 0 prints for every rank
    outcome: Dict[str, str] = {}
    redo = list(redo)
    for st in stages:
        if st.name not in targets:
            continue
        # rank 0 reads the ledger and decides; every rank gets the decision (or its error)
        action, inputs, reason = dist.on_main(_decide, run, st, cfg, fingerprints, redo, stages,
                                              say, explicit)
        if action == "run":
            _run_one(run, st, cfg, fingerprints, inputs, say, reason)
            if st.name in redo:
                redo.remove(st.name)
        outcome[st.name] = action if action != "run" else "ran"
    return outcome


def _decide(run: RunDir, st: Stage, cfg, fingerprints, redo, stages, say, explicit: bool
            ) -> Tuple[str, Dict[str, Optional[str]], str]:
    """(what to do with ``st``: "run", "done before" or "skipped"; its inputs; why)."""
    status = stage_status(run, cfg, fingerprints, redo=redo, stages=stages)
    run_id, reason = status[st.name]
    if not st.enabled(cfg):
        if explicit:
            raise RunDirError(f"stage {st.name!r} is disabled by the settings "
                              f"({_DISABLED_WHY.get(st.name, reason)})")
        return "skipped", {}, reason
    if run_id is not None:
        rec = run.finished_record(st.name) or {}
        say(f"[{st.name}] already done ({rec.get('finished', '?')}); "
            f"pass --redo {st.name} to run it again")
        return "done before", {}, reason
    missing = [d for d in st.deps(cfg) if status[d][0] is None]
    if missing:
        d = missing[0]
        why = status[d][1]
        raise RunDirError(f"stage {st.name!r} needs stage {d!r}, which is {why} in "
                          f"{run.path}; run `t3s {d}` (or `t3s run`) first")
    return "run", _inputs(st, cfg, status), reason


#: why a stage the settings disable is off (the default: the status's reason)
_DISABLED_WHY = {"baseline": "baseline is none", "arms": "arms is empty"}


def _read_attempt(partial: Path) -> Optional[Dict[str, Any]]:
    """What an interrupted attempt was started under (None when unreadable: start afresh)."""
    try:
        return read_json(partial / ATTEMPT_FILE)
    except (OSError, ValueError):
        return None


def _run_one(run: RunDir, st: Stage, cfg, fingerprints, inputs, say, reason: str) -> None:
    attempt = {"hash": stage_hash(st, cfg, fingerprints), "inputs": dict(inputs),
               "world_size": dist.world_size()}
    ctx = StageContext(st.name, dict(cfg), run.partial_dir(st.name), run, dict(inputs), say,
                       dict(fingerprints))
    if st.check is not None:
        dist.on_main(st.check, ctx)
    ctx.resume = dist.on_main(_prepare, run, st, attempt, say, reason)
    t0 = time.perf_counter()
    started = now()
    summary = st.fn(ctx) if st.ranks == "all" or dist.is_main() else None
    dist.on_main(_commit, run, st, attempt, started, time.perf_counter() - t0, summary, say)


def _prepare(run: RunDir, st: Stage, attempt, say, reason: str) -> bool:
    """Rank 0: the stage's partial directory, resumed (True) or new (False)."""
    partial = run.partial_dir(st.name)
    resume = False
    if partial.exists():
        resume = st.resumable and _read_attempt(partial) == attempt
        if not resume:
            say(f"[{st.name}] removing the unfinished attempt left by an interrupted run")
            shutil.rmtree(partial)
    if run.stage_dir(st.name).exists():
        run.invalidate(st.name)  # stale or asked to redo: its outputs are replaced
    if resume:
        say(f"[{st.name}] resuming the attempt an interrupted run left ({reason})")
    else:
        partial.mkdir(parents=True)
        write_json(partial / ATTEMPT_FILE, attempt)
        say(f"[{st.name}] running ({reason})")
    return resume


def _commit(run: RunDir, st: Stage, attempt, started: str, seconds: float, summary, say) -> None:
    """Rank 0: the stage's record written and its directory renamed into place."""
    record = {"stage": st.name, "run_id": uuid.uuid4().hex, **attempt,
              "started": started, "finished": now(), "seconds": round(seconds, 3),
              "summary": summary or {}}
    (run.partial_dir(st.name) / ATTEMPT_FILE).unlink(missing_ok=True)
    run.commit(st.name, record)
    say(f"[{st.name}] done in {seconds:.1f} s")
