"""Cross-model runs: a selector's selection trains another student.

``--student DIR``: ``--model`` is the *selector*; the pilot and the selection run on
it, and the retraining stages (train, baseline, arms) and the eval stage run on the
student, each from the student's own θ0 (`student_settings`). ``--artifact PATH``
reuses a finished selection (a ``selection.parquet`` or the run directory holding
it) instead of a pilot and a selection: the select stage then copies it and derives
the baseline's and the arms' masks from its columns (`import_selection`).

`check_cross_model` runs before any directory is written: the student's tokenizer
must give the selector's token ids on every trace (`t3s.cross_model`), the reused
artifact must carry the columns the asked-for comparisons need, and the stages that
study the selector's own pilot (analyze, sensitivity) are refused.

Pipeline layer: imported by `t3s.pipeline.stages` and `t3s.pipeline.commands`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .._util import one_line
from . import rundir
from .arms import write_selection_outputs
from .engine import StageContext
from .loaders import check_model_dir, load_data, load_tokenizer
from .settings import UsageError

__all__ = ["STUDENT_STAGES", "student_settings", "artifact_file", "load_selection",
           "check_cross_model", "import_selection"]

#: the stages that run on the student (``--student``)
STUDENT_STAGES = ("train", "baseline", "arms", "eval")
#: the stages that apply the selector's masks to the student's tokens
MASKED_STAGES = ("train", "baseline", "arms")
#: the artifact columns a comparison derived from a reused artifact needs
ARM_COLUMNS = {"rho1": ("loss_theta", "loss_ref"), "entropy": ("delta_entropy",),
               "logit_grad": ("delta_logit_grad",), "kl": ("kl",), "static": ("c0",)}


def student_settings(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The settings a student stage runs with: ``model`` is the student (θ0 of every
    retraining and of the eval) with its own tokenizer; ``cfg`` itself without one."""
    if not cfg.get("student"):
        return cfg
    return {**cfg, "model": cfg["student"], "tokenizer": None}


def artifact_file(path: str) -> Path:
    """The selection file ``--artifact`` names: the file itself, or the
    ``select/selection.parquet`` of a run directory. UsageError when there is none."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "select" / rundir.SELECTION_FILE, p / rundir.SELECTION_FILE):
            if candidate.is_file():
                return candidate
        raise UsageError(f"--artifact {path}: no select/{rundir.SELECTION_FILE} in it (a "
                         "finished `t3s run` directory holds one)")
    if not p.is_file():
        raise UsageError(f"--artifact {path} does not exist")
    return p


def load_selection(path: str):
    """The `t3s.SelectionArtifact` that ``--artifact`` names (UsageError if unreadable)."""
    from ..artifact import SelectionArtifact
    file = artifact_file(path)
    try:
        return SelectionArtifact.load(file)
    except (ValueError, OSError) as e:
        raise UsageError(f"--artifact {file}: {one_line(e)}") from None


def _check_reuse(cfg: Mapping[str, Any], art) -> None:
    """UsageError unless the reused artifact gives the run's rule and every comparison."""
    if art.mask_column != "loss_mask":
        raise UsageError(f"--artifact: rule {art.rule!r} gives a {art.mask_column!r} set, not a "
                         "loss mask; an autoregressive student needs a loss-mask artifact")
    if cfg["rule"] != art.rule:
        raise UsageError(f"--artifact: its mask comes from rule {art.rule!r}, and a reused mask "
                         f"is not recomputed; pass --rule {art.rule}")
    names = [cfg["baseline"], *(cfg.get("arms") or ())]
    for name in names:
        missing = [c for c in ARM_COLUMNS.get(name, ()) if c not in art.table]
        if missing:
            raise UsageError(f"--artifact: the comparison {name!r} needs the column(s) "
                             f"{', '.join(missing)}, which the artifact lacks (its selection "
                             f"ran without {name!r}); add --arms {name} to the selector's run, "
                             "or leave it out here")


def _selector_examples(cfg: Mapping[str, Any], art) -> Optional[list]:
    """The training traces under the selector's tokenizer: the run's ``--model`` (or
    ``--tokenizer``), or, for a reused artifact, its recorded selector when that
    directory still exists; None when neither is at hand."""
    if art is None:
        selector = cfg
    else:
        path = art.metadata.get("selector")
        if not path or not (Path(path) / "config.json").is_file():
            return None
        selector = {**cfg, "model": path, "tokenizer": None}
    return list(load_data(selector, "train", load_tokenizer(selector)))


def check_cross_model(cfg: Mapping[str, Any], pending: Sequence[str]) -> Optional[str]:
    """Before any work, for ``--student`` / ``--artifact``: UsageError on what the
    pending stages would trip over; a one-line note when the student's tokenizer
    differs from the selector's yet gives the same token ids; None otherwise."""
    if not cfg.get("student"):
        return None
    from ..artifact import tokenizer_signature
    from ..cross_model import check_same_tokens, check_student
    for stage in ("analyze", "sensitivity"):
        if stage in pending:
            raise UsageError(f"the {stage} stage studies the pilot's own model and is not "
                             "supported with --student; run it on the selector's run alone")
    if any(s in STUDENT_STAGES for s in pending):
        check_model_dir(cfg["student"], trust_remote_code=cfg["trust_remote_code"],
                        what="student")
    art = load_selection(cfg["artifact"]) if cfg.get("artifact") else None
    if art is not None:
        _check_reuse(cfg, art)
    if not any(s in MASKED_STAGES for s in pending):
        return None
    student = student_settings(cfg)
    tok = load_tokenizer(student)
    if art is None:
        same = tokenizer_signature(load_tokenizer(cfg))["fingerprint"] == \
            tokenizer_signature(tok)["fingerprint"]
        if same:
            return None
    train = list(load_data(student, "train", tok))
    try:
        if art is None:
            return check_same_tokens(_selector_examples(cfg, None), train)
        return check_student(art, tok, train, selector_examples=_selector_examples(cfg, art))
    except ValueError as e:
        raise UsageError(("" if art is None else "--artifact: ") + one_line(e)) from None


def import_selection(ctx: StageContext) -> Dict[str, Any]:
    """The select stage with ``--artifact``: the reused selection copied into the run,
    with the baseline's and the arms' masks derived from it (rank 0 writes)."""
    from .. import dist
    if not dist.is_main():
        return {}
    path = artifact_file(ctx.cfg["artifact"])
    art = load_selection(str(path))
    extra = art.metadata.get("extra") or {}
    agreement = extra.get("agreement") or {}
    ctx.say(f"[select] reusing {path} (rule {art.rule}, selector {art.metadata.get('selector')})")
    return write_selection_outputs(ctx, art, {
        "bottleneck_step": extra.get("bottleneck_step"),
        "delta_source": extra.get("delta_source"),
        "unvisited_tokens": extra.get("unvisited_tokens"),
        "mask_agreement": agreement.get("mask_agreement"), "agreement": extra.get("agreement"),
        "artifact": str(path), "selector": art.metadata.get("selector")})
