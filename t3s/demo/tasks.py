"""The demo's built-in tasks: ``t3s demo --task NAME``.

Both tasks use the same shipped base student θ0 (`t3s.demo.model`: it sums 2 and 3
two-digit numbers step by step in its own compact style and has never seen a 4-term
sum), the same rule-based teacher (`t3s.demo.task`: the same steps, one spaced step per
line) and the same held-out parts, scored separately:

* ``heldout`` (``heldout.jsonl``): held-out 2- and 3-term sums, what the base can
  already do (it scores 1.000 there);
* ``extra_test`` (``four_terms.jsonl``): held-out 4-term sums, what only the teacher's
  traces show (the base scores 0.000 there).

They differ in what the teacher gives and how long the student learns:

* ``teach`` (the default): 600 traces, a third of them 4-term sums, and a training
  budget (lr 1e-3, `TEACH_SETTINGS`) in which plain SFT crashes and then recovers: the
  teacher's traces carry something the base lacks, and a student can end above where
  it started.
* ``style``: the first demo: 200 traces and a gentle budget (lr 3e-4, 90 steps), in
  which plain SFT never recovers from the shock; the traces restyle what the student
  already does. Kept for comparison and for the diffusion demo.

A task only chooses data sizes and `t3s run` settings: the run directory, the stages and
the report are the same, and ``--task`` is recorded in the run's settings through
them (a directory holding one task's run refuses another's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

__all__ = ["DemoTask", "TASKS", "DEFAULT_TASK", "task_named"]


@dataclass(frozen=True)
class DemoTask:
    """A built-in demo task.

    sizes / quick_sizes: `t3s.demo.write_data`'s arguments (``trace_counts``: traces per
    number of terms; ``heldout_size``: held-out 2/3-term sums; ``four_term_size``:
    held-out 4-term sums). settings / quick_settings: `t3s run` settings that replace
    the demo's common ones (`t3s.demo.SETTINGS`, `t3s.demo.QUICK_SETTINGS`).
    """

    name: str
    summary: str
    sizes: Mapping[str, Any]
    quick_sizes: Mapping[str, Any]
    settings: Mapping[str, Any] = field(default_factory=dict)
    quick_settings: Mapping[str, Any] = field(default_factory=dict)


#: the teach task's training budget: plain SFT crashes, then recovers (chosen on the
#: pilot's curves and the base alone, before any T3S result)
TEACH_SETTINGS: Dict[str, Any] = {
    "steps": 240, "lr": 1e-3, "eval_steps": 20,
    # every comparison arm (same steps and lr; random, rho1, static, kl: T3S's token budget)
    "baseline": "random", "arms": ["dft", "rho1", "static", "entropy", "logit_grad", "kl"],
    "analysis_params": {"examples": 32, "transfer_at": ["theta0", "thetab", "train:60",
                                                        "t3s_final"]},
}

TASKS: Dict[str, DemoTask] = {
    "teach": DemoTask(
        "teach",
        "the teacher's traces add 4-term sums, which the base has never seen; plain SFT "
        "crashes, then recovers",
        sizes={"trace_counts": {2: 200, 3: 200, 4: 200}, "heldout_size": 200,
               "four_term_size": 200},
        quick_sizes={"trace_counts": {2: 40, 3: 40, 4: 40}, "heldout_size": 48,
                     "four_term_size": 32},
        settings=TEACH_SETTINGS,
        # the quick variant (tests): every stage on a short budget, with three arms of
        # different kinds (a loss: DFT; a reference model: Rho-1; a static signal);
        # tests/pipeline/test_arms.py runs every arm
        quick_settings={**TEACH_SETTINGS, "steps": 20, "eval_steps": 5, "eval_subset": 16,
                        "batch_size": 32, "arms": ["dft", "rho1", "static"],
                        "analysis_params": {"examples": 16, "transfer_at": [
                            "theta0", "thetab", "train:10", "t3s_final"]}},
    ),
    "style": DemoTask(
        "style",
        "the teacher restyles what the base already does; plain SFT does not recover",
        sizes={"trace_counts": {2: 67, 3: 67, 4: 66}, "heldout_size": 200,
               "four_term_size": 100},
        quick_sizes={"trace_counts": {2: 67, 3: 67, 4: 66}, "heldout_size": 100,
                     "four_term_size": 50},
    ),
}
DEFAULT_TASK = "teach"


def task_named(name: str) -> DemoTask:
    """The task called ``name``; `t3s.pipeline.settings.UsageError` (a ValueError, which
    the command line reports in one line) listing the tasks otherwise."""
    from ..pipeline.settings import UsageError
    try:
        return TASKS[str(name)]
    except KeyError:
        raise UsageError(f"unknown demo task {name!r}; the tasks are: "
                         + ", ".join(f"{n} ({t.summary})" for n, t in TASKS.items())) from None


def task_names() -> Tuple[str, ...]:
    return tuple(TASKS)
