"""The embedded demo: Imitation Shock and T3S on a task that runs on 2 CPU cores.

``t3s demo [--quick] [--task NAME] [--seeds LIST] [--out DIR]`` calls `main`, which

1. writes the data of the task (`t3s.demo.tasks`; ``teach`` by default) into
   ``DIR/data/`` with `t3s.demo.task`: ``train.jsonl`` (the rule-based teacher's
   traces of 2-, 3- and 4-term sums, the student's reasoning steps in the teacher's
   layout: one spaced step per line), ``heldout.jsonl`` (held-out 2- and 3-term sums,
   which the base student answers in its own style; the headline accuracies) and
   ``four_terms.jsonl`` (held-out 4-term sums, which the base has never seen;
   ``extra_test``);
2. runs the stages of ``t3s run`` (`t3s.pipeline.stages`) in ``DIR`` on the shipped base
   student θ0 (``t3s/demo/assets/base``, `t3s.demo.model`): the pilot SFT
   (= plain SFT), selection (bottleneck, Δc, anchor mask), T3S retraining, a
   random-mask baseline with the same token budget, the task's further arms (``teach``:
   DFT, Rho-1, static confidence and the trajectory-signal rules, `t3s.pipeline.arms`),
   evaluation on both held-out sets, the diagnostics (``DIR/analyze/``,
   `t3s.pipeline.diagnostics`, on every evaluated checkpoint of the pilot and of T3S, which
   the demo keeps) and the report (``DIR/report/``: ``report.md`` with the diagnostics'
   section, ``metrics.json``, ``shock.png``, ``delta_hist.png``, ``traces.png`` and the
   ``analysis_*.png`` figures).

With ``--seeds 0,1,2`` it does this once per seed in ``DIR/seed-<s>/`` and summarises the
arms as mean ± standard error in ``DIR/summary/`` (`t3s.demo.seeds`).

Under ``torchrun`` / ``accelerate launch`` the demo runs as ``t3s run`` does
there (`t3s.pipeline.commands`): rank 0 writes the data and owns ``DIR``, each
rank trains on its slice of every batch and the profiling and generation are
split across the ranks; the numbers equal one process's within float32
rounding.

``DIR`` is an ordinary run directory: running the demo again resumes after the
last finished stage, and ``t3s report --run-dir DIR`` etc. work on it. As with
``t3s run``, ``--redo STAGE`` runs a stage again (and the stages that use its
outputs), ``--overwrite`` deletes the directory's run and starts afresh (also
when it holds a demo run with other settings), and progress bars are drawn
only when stderr is a terminal unless ``--progress`` / ``--no-progress`` says.

Modules:

* `t3s.demo.runner`: `main` and what it uses (the data of a task, its settings, the checks
  on the output directory); this package re-exports its names.
* `t3s.demo.task`: the sums, the student's and the teacher's answer styles, seeded
  generators with a hash-based train/held-out split, a JSONL writer.
* `t3s.demo.tasks`: the built-in tasks (data sizes and training budget).
* `t3s.demo.seeds`: several seeds and their summary.
* `t3s.demo.model`: the char-level tokenizer, the ~0.86M-parameter Llama
  config, the shipped base θ0 (built by ``scripts/build_demo_base.py``) and
  fast batched greedy generation.
* `t3s.demo.evaluate`: greedy accuracy on problem lists (used by the base build).

``t3s demo --diffusion`` (T3S for a bidirectional, masked-diffusion student with the AR
student as selector) lives with the diffusion method: `t3s.dllm.demo` and its student
`t3s.dllm.demo_model` (whose files ship here, in ``assets/diffusion_base``).
"""

from .runner import (main, demo_settings, write_data, check_demo_dir, install_data,
                     refuse_other_settings, DATA_SIZES, QUICK_DATA_SIZES, SETTINGS,
                     QUICK_SETTINGS, BASE_DIR, PARAM_COUNT, build_tokenizer, load_base,
                     Problem, DEFAULT_TASK, TASKS, default_out)

__all__ = ["main", "demo_settings", "write_data", "check_demo_dir", "install_data",
           "refuse_other_settings", "DATA_SIZES", "QUICK_DATA_SIZES",
           "SETTINGS", "QUICK_SETTINGS", "BASE_DIR", "PARAM_COUNT", "build_tokenizer",
           "load_base", "Problem", "DEFAULT_TASK", "TASKS", "default_out"]
