"""``t3s demo --diffusion``: T3S for a diffusion LM on the demo task, with the AR student as selector.

`main` writes the demo's data (`t3s.demo.write_data`: the teacher's traces and
the held-out sets) into ``DIR/data/`` and runs two run directories:

1. ``DIR/plain/``: plain diffusion SFT of the diffusion student
   (`t3s.dllm.demo_model`, ``t3s/demo/assets/diffusion_base``, built once by
   ``scripts/build_demo_diffusion_base.py``; without it the demo stops and says
   so) on the traces, the
   ``train`` stage with ``objective: diffusion, rule: none``;
2. ``DIR/``: the whole pipeline with ``objective: diffusion``: the pilot SFT and
   the selection on the shipped AR student (the selector; it shares the
   diffusion student's tokenizer), the forced set S = {Δc < −0.2}, T3S
   diffusion SFT with it (``train``), a random forced set of the same size
   (``baseline``), evaluation of the diffusion θ0, plain SFT (from 1.), T3S and
   the random set by iterative unmasking, and the report
   (``DIR/report/``: ``report.md``, ``metrics.json`` with ``base_acc``,
   ``sft_acc``, ``t3s_acc``, ``baseline_acc``, ``forced_fraction``, and
   ``shock.png``).

``--quick`` (for tests) trains 30 steps instead of 90, evaluates every 10 steps on 16
problems during training, and scores 32 held-out 2/3-term sums and 16 4-term sums
(`QUICK_DIFFUSION_OVERRIDES`, `QUICK_DIFFUSION_SIZES`).

Both resume like ``t3s run``; ``--overwrite`` starts afresh, ``--redo STAGE``
runs a stage of the main directory again (``train`` and ``all`` also redo the
plain arm).

Demo layer (with `t3s.demo` and `t3s.cli`): it runs the pipeline's stages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from .._util import torch_threads
from ..demo.runner import (DATA_SIZES, QUICK_DATA_SIZES, check_demo_dir, demo_settings,
                           install_data, refuse_other_settings)
from ..demo.tasks import task_named
from .demo_model import DLM_BLOCK_LENGTH, DLM_DIR, dlm_exists

__all__ = ["main", "DIFFUSION_OVERRIDES", "QUICK_DIFFUSION_OVERRIDES", "QUICK_DIFFUSION_SIZES",
           "PLAIN_DIR"]

#: the settings of the diffusion demo on top of the AR demo's (the AR demo's diagnostics
#: of its pilot are not part of this demo: no analyze stage, no kept checkpoints)
DIFFUSION_OVERRIDES: Dict[str, Any] = {
    "objective": "diffusion", "diffusion_model": str(DLM_DIR), "rule": "forced",
    "baseline": "random", "block_length": DLM_BLOCK_LENGTH, "agreement": False,
    "analyze": False, "keep_checkpoints": False, "arms": [],
}
#: the quick demo (for tests, within a minute on 2 CPU cores): on top of the AR quick
#: demo's settings, fewer steps, evaluations and held-out problems
QUICK_DIFFUSION_OVERRIDES: Dict[str, Any] = {"steps": 30, "eval_steps": 10, "eval_subset": 16}
QUICK_DIFFUSION_SIZES: Dict[str, Any] = {**QUICK_DATA_SIZES, "heldout_size": 32,
                                         "four_term_size": 16}
#: the plain diffusion-SFT run, inside the demo directory
PLAIN_DIR = "plain"


def main(quick: bool = False, out: Optional[str] = None, *, task: str = "style",
         say: Callable[[str], None] = print, redo: Sequence[str] = (), overwrite: bool = False,
         **overrides) -> Dict[str, Any]:
    """Run the diffusion demo on ``task`` (`t3s.demo.tasks`; ``style`` by default) into
    ``out`` (default ``runs/demo-diffusion``, with ``quick`` ``runs/demo-diffusion-quick``,
    ``runs/demo-diffusion-<task>[-quick]`` for another task); returns the report's
    metrics. ``overrides``: data sizes and `t3s run` settings, as for `t3s.demo.main`.
    The task's data and training budget apply; its extra arms do not (the diffusion
    path trains plain SFT, T3S's forced set and a random set of its size)."""
    from ..pipeline.commands import redo_list
    from ..pipeline.console import quiet_libraries, show_progress
    from ..pipeline.engine import run_stages
    from ..pipeline.rundir import (METRICS_FILE, MODEL_DIR, REPORT_FILE, RunDir, RunDirError,
                                   read_json)
    from ..pipeline.settings import PATH_KEYS, fingerprint_path, normalize_config
    from ..pipeline.stages import STAGE_NAMES, STAGES
    from .report import DIFFUSION_METRIC_KEYS
    chosen = task_named(task)
    t0 = time.perf_counter()
    name = "runs/demo-diffusion" + ("" if task == "style" else f"-{task}")
    out_path = Path(out if out is not None else (name + "-quick" if quick else name))
    out_path = out_path.expanduser().resolve()
    if task == "style":
        sizes = dict(QUICK_DIFFUSION_SIZES if quick else DATA_SIZES)
    else:
        sizes = dict(chosen.quick_sizes if quick else chosen.sizes)
    sizes.update({k: overrides.pop(k) for k in list(sizes) if k in overrides})
    run, plain = RunDir(out_path), RunDir(out_path / PLAIN_DIR)
    check_demo_dir(out_path, run, ours=(PLAIN_DIR,))
    redo = redo_list("run", redo)
    if "diffusion_model" not in overrides and not dlm_exists():
        raise RunDirError(f"the diffusion demo's student is not built ({DLM_DIR} has no model); "
                          "build it once with `python scripts/build_demo_diffusion_base.py` "
                          "(6000 training steps, about 25 min on 2 CPU cores), or pass diffusion_model=")
    out_path.mkdir(parents=True, exist_ok=True)
    with run.locked():
        if overwrite and (run.is_run_dir() or plain.is_run_dir()):
            say(f"t3s demo --diffusion: starting {out_path} afresh (--overwrite)")
            run.wipe()

        def settle(data, staged):
            quick_over = QUICK_DIFFUSION_OVERRIDES if quick and task == "style" else {}
            values = demo_settings(quick, out_path, data, task=task, **{
                **DIFFUSION_OVERRIDES, **quick_over, **overrides})
            cfg = normalize_config({**values, "sft_model": sft_model})
            plain_cfg = normalize_config({**values, "rule": "none", "baseline": "none",
                                          "run_dir": str(plain.path)})
            fps = {r: {key: fingerprint_path(staged.get(key, c[key])) for key in PATH_KEYS}
                   for r, c in (("main", cfg), ("plain", plain_cfg))}
            refuse_other_settings(run, cfg, fps["main"])
            refuse_other_settings(plain, plain_cfg, fps["plain"])
            return cfg, plain_cfg, fps

        sft_model = str(plain.path / "train" / MODEL_DIR)
        cfg, plain_cfg, fps = install_data(out_path, sizes, int(overrides.get("seed", 0)), settle)
        say(f"t3s demo --diffusion{' --quick' if quick else ''}: {out_path} (selector θ0: "
            f"{cfg['model']}; diffusion θ0: {cfg['diffusion_model']})")
        quiet_libraries(show_progress(cfg["progress"]), False)
        with torch_threads(cfg["threads"]):
            outcome: Dict[str, str] = {}
            plain_redo = ["train"] if ("train" in redo) else []
            with plain.locked():
                plain.write_config(plain_cfg, fps["plain"])
                say("[plain] the plain diffusion-SFT arm, in " + str(plain.path))
                done = run_stages(plain, plain_cfg, fps["plain"], ["train"], redo=plain_redo, say=say,
                                  stages=STAGES)
                outcome.update({f"plain {k}": v for k, v in done.items()})
            # the plain model exists now: its fingerprint joins the main run's identity
            fps["main"]["sft_model"] = fingerprint_path(sft_model)
            run.write_config(cfg, fps["main"])
            outcome.update(run_stages(run, cfg, fps["main"], list(STAGE_NAMES), redo=redo, say=say,
                                      stages=STAGES))
    metrics = read_json(run.stage_dir("report") / METRICS_FILE)
    say("t3s: " + ", ".join(f"{k} {'n/a' if metrics.get(k) is None else format(metrics[k], '.3f')}"
                            for k in DIFFUSION_METRIC_KEYS))
    say(f"t3s: report in {run.stage_dir('report') / REPORT_FILE}")
    ran = [s for s, v in outcome.items() if v == "ran"]
    say(f"t3s demo --diffusion: {'ran ' + ', '.join(ran) if ran else 'nothing to do'} in "
        f"{time.perf_counter() - t0:.0f} s")
    return metrics


