"""What `t3s demo` does (`t3s.demo` describes it): the data of a task, its `t3s run`
settings, the checks on the output directory, and `main`, which runs the stages."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .._util import torch_threads
from .evaluate import max_new_tokens_for
from .model import BASE_DIR, PARAM_COUNT, build_tokenizer, load_base
from .task import Problem
from .tasks import DEFAULT_TASK, TASKS, task_named

__all__ = ["main", "demo_settings", "write_data", "check_demo_dir", "install_data",
           "refuse_other_settings", "DATA_SIZES", "QUICK_DATA_SIZES",
           "SETTINGS", "QUICK_SETTINGS", "BASE_DIR", "PARAM_COUNT", "build_tokenizer",
           "load_base", "Problem", "DEFAULT_TASK", "TASKS", "default_out"]


#: the data of the `style` task (`t3s.demo.tasks`): teacher traces per number of terms,
#: held-out 2/3-term problems (half each) and held-out 4-term problems
DATA_SIZES: Dict[str, Any] = dict(TASKS["style"].sizes)
QUICK_DATA_SIZES: Dict[str, Any] = dict(TASKS["style"].quick_sizes)

#: `t3s run` settings common to the demo's tasks, those of its `style` task (a task replaces
#: some: `t3s.demo.tasks`; model, data and run_dir are added by `demo_settings`)
SETTINGS: Dict[str, Any] = {
    "seed": 0, "steps": 90, "batch_size": 64, "lr": 3e-4, "lr_scheduler": "constant",
    "warmup_steps": 0, "eval_steps": 5, "eval_subset": 64,
    "max_new_tokens": max_new_tokens_for(4),  # the longest teacher-style 4-term answer, plus 4
    "eval_batch_size": 256, "verifier": "math", "device": "cpu",
    "rule": "anchor", "delta": "online", "agreement": True, "baseline": "random",
    # the diagnostics, on every evaluated checkpoint of the pilot and of T3S
    "analyze": True, "keep_checkpoints": True,
    "analysis_params": {"examples": 32,
                        "transfer_at": ["theta0", "thetab", "train:25", "t3s_final"]},
}
#: the quick demo (for tests): fewer steps and evaluations
QUICK_SETTINGS: Dict[str, Any] = {**SETTINGS, "steps": 60, "eval_steps": 5, "eval_subset": 32}

_DATA_KEYS = ("trace_counts", "heldout_size", "four_term_size")


def write_data(data_dir: os.PathLike, *, trace_counts: Mapping[int, int], heldout_size: int,
               four_term_size: int, seed: int = 0) -> Dict[str, str]:
    """Write ``train.jsonl`` (teacher traces), ``heldout.jsonl`` (2/3-term) and
    ``four_terms.jsonl`` (4-term) into ``data_dir``; returns {"train", "heldout",
    "extra_test"} -> path. Deterministic given the arguments, so a rerun writes the
    same bytes."""
    from ..pipeline.rundir import DEMO_DATA_FILES as names
    from . import task
    data_dir = Path(data_dir)
    traces = task.make_mixed_problems({int(k): int(v) for k, v in trace_counts.items()},
                                      "train", seed=seed)
    half = heldout_size // 2
    heldout = (task.make_problems(half, 2, "held_out", seed=seed)
               + task.make_problems(heldout_size - half, 3, "held_out", seed=seed))
    four = task.make_problems(four_term_size, 4, "held_out", seed=seed)
    # the answer style of the evaluation sets does not matter (only prompt and answer are used)
    return {key: task.write_jsonl(data_dir / names[key], problems, "teacher")
            for key, problems in (("train", traces), ("heldout", heldout), ("extra_test", four))}


def check_demo_dir(out_path: Path, run, ours: Sequence[str] = ()) -> None:
    """RunDirError unless ``out_path`` is missing, a run directory, or holds only what a
    demo puts there (data/, the lock, staging folders, ``ours``)."""
    from ..pipeline.rundir import DEMO_DATA_DIR, DEMO_STAGING_PREFIX, LOCK_FILE, RunDirError
    allowed = (DEMO_DATA_DIR, LOCK_FILE, *ours)
    if out_path.exists() and not run.is_run_dir() and any(
            p.name not in allowed and not p.name.startswith(DEMO_STAGING_PREFIX)
            for p in out_path.iterdir()):
        raise RunDirError(f"{out_path} exists and is not a t3s demo directory; choose another "
                          "--out")


def refuse_other_settings(run, cfg: Mapping[str, Any], fps: Mapping[str, Any]) -> None:
    """RunDirError when ``run`` holds a demo run with settings other than ``cfg``."""
    from ..pipeline.rundir import RunDirError
    diff = run.config_diff(cfg, fps)
    if diff:
        raise RunDirError(f"{run.path} holds a demo run with other settings "
                          f"({'; '.join(diff)}); pass --overwrite to start it afresh, "
                          "or choose another --out")


def install_data(out_path: Path, sizes: Mapping[str, Any], seed: int,
                 settle: Callable[[Dict[str, str], Dict[str, str]], Any]) -> Any:
    """Write the demo's data next to ``out_path/data/``, call ``settle(data, staged)``
    (data: key -> final path, staged: key -> the written file; it builds the settings
    and refuses other ones by raising), and only then move the files into data/;
    returns what ``settle`` returned. A refused call changes nothing. Call it with the
    run directory's lock held."""
    from ..pipeline.rundir import DEMO_DATA_DIR, DEMO_STAGING_PREFIX
    staging = Path(tempfile.mkdtemp(prefix=DEMO_STAGING_PREFIX, dir=out_path))
    try:
        staged = write_data(staging, seed=seed, **sizes)
        data = {k: str(out_path / DEMO_DATA_DIR / Path(v).name) for k, v in staged.items()}
        settled = settle(data, staged)
        (out_path / DEMO_DATA_DIR).mkdir(exist_ok=True)
        for key, path in staged.items():
            os.replace(path, data[key])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return settled


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    n //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # ranks share the cores
    return max(1, min(2, n))  # a 0.86M-parameter model gains nothing from more threads


def demo_settings(quick: bool, out: os.PathLike, data: Mapping[str, str], *,
                  task: str = DEFAULT_TASK, **overrides) -> Dict[str, Any]:
    """The `t3s run` settings of the demo's ``task`` (`t3s.demo.tasks`), before
    `t3s.pipeline.settings.normalize_config`."""
    values = dict(QUICK_SETTINGS if quick else SETTINGS)
    chosen = task_named(task)
    values.update(chosen.quick_settings if quick else chosen.settings)
    values.update(model=str(BASE_DIR), threads=_default_threads(), run_dir=os.fspath(out), **data)
    values.update(overrides)
    return values


def default_out(quick: bool, task: str = DEFAULT_TASK) -> str:
    """``runs/demo`` (``runs/demo-quick`` with ``quick``); ``runs/demo-<task>[-quick]`` for a
    task other than the default."""
    name = "runs/demo" if task == DEFAULT_TASK else f"runs/demo-{task}"
    return name + ("-quick" if quick else "")


def main(quick: bool = False, out: Optional[str] = None, *, task: str = DEFAULT_TASK,
         seeds: Optional[Sequence[int]] = None, say: Callable[[str], None] = print,
         redo: Sequence[str] = (), overwrite: bool = False, **overrides) -> Dict[str, Any]:
    """Run the demo's ``task`` (`t3s.demo.tasks`) into ``out`` (default: `default_out`) and
    return the report's metrics (``metrics.json``).

    seeds: run every seed into ``out/seed-<s>/`` and summarise them as mean ± standard
    error in ``out/summary/`` (`t3s.demo.seeds`); returns the summary's metrics.

    ``overrides``: data sizes (``trace_counts``, ``heldout_size``, ``four_term_size``)
    and any `t3s run` setting (``steps``, ``progress``, ``threads``, ...). Running
    again with the same settings resumes (finished stages are skipped); a
    directory holding a run with other settings is refused
    (`t3s.pipeline.rundir.RunDirError`) unless ``overwrite``.

    redo: stage names to run again ("all": every stage), as ``t3s run --redo``;
    the stages that use their outputs follow. overwrite: delete the directory's
    run and start afresh, as ``t3s run --overwrite``.
    """
    from .. import dist
    from ..pipeline.commands import redo_list
    from ..pipeline.console import print_metrics, quiet_libraries, show_progress
    from ..pipeline.engine import run_stages
    from ..pipeline.generators import check_engine
    from ..pipeline.rundir import METRICS_FILE, RunDir, read_json
    from ..pipeline.settings import PATH_KEYS, UsageError, fingerprint_path, normalize_config
    from ..pipeline.stages import STAGE_NAMES, STAGES
    chosen = task_named(task)
    if seeds is not None:
        from .seeds import run_seeds
        if "seed" in overrides:
            raise UsageError("give either seed or seeds, not both")
        if not seeds:
            raise UsageError("seeds is empty")
        return run_seeds(main, list(seeds), out if out is not None else default_out(quick, task) + "-seeds",
                         say=say, quick=quick, task=task, redo=redo, overwrite=overwrite,
                         **overrides)
    t0 = time.perf_counter()
    check_engine({"engine": overrides.get("engine", "hf")}, STAGE_NAMES)   # before any work
    out_path = Path(out if out is not None else default_out(quick, task))
    out_path = out_path.expanduser().resolve()
    sizes = dict(chosen.quick_sizes if quick else chosen.sizes)
    sizes.update({k: overrides.pop(k) for k in _DATA_KEYS if k in overrides})
    run = RunDir(out_path)
    dist.init_from_launcher("cpu")
    say = dist.main_only(say)   # rank 0 prints for every rank
    redo = redo_list("run", redo)   # checks the names; "all" -> every stage

    def start(held):
        # The lock is held from here on, so --overwrite never deletes what another process
        # is writing. The data is written next to data/ first and moved in only once the
        # settings are known to match the directory's run, so a refused call changes nothing.
        check_demo_dir(out_path, run)
        out_path.mkdir(parents=True, exist_ok=True)
        held.enter_context(run.locked())
        if overwrite and run.is_run_dir():
            say(f"t3s demo: starting {out_path} afresh (--overwrite)")
            run.wipe()

        def settle(data, staged):
            cfg = normalize_config(demo_settings(quick, out_path, data, task=task, **overrides))
            fps = {key: fingerprint_path(staged.get(key, cfg[key])) for key in PATH_KEYS}
            refuse_other_settings(run, cfg, fps)   # nothing to refuse after --overwrite
            return cfg, fps

        cfg, fps = install_data(out_path, sizes, int(overrides.get("seed", 0)), settle)
        run.write_config(cfg, fps)
        return cfg, fps

    with contextlib.ExitStack() as held:
        # rank 0 writes the data and the config; every rank gets the settings (or the error)
        cfg, fps = dist.on_main(start, held)
        ranks = f", {dist.world_size()} ranks" if dist.world_size() > 1 else ""
        say(f"t3s demo{' --quick' if quick else ''} --task {task}: {out_path} (θ0: {BASE_DIR}; "
            f"{cfg['threads']} torch thread{'s' if cfg['threads'] != 1 else ''}{ranks})")
        quiet_libraries(show_progress(cfg["progress"]), False)
        with torch_threads(cfg["threads"]):
            outcome = run_stages(run, cfg, fps, list(STAGE_NAMES), redo=redo, say=say,
                                 stages=STAGES)
    dist.barrier()   # rank 0's report is written
    metrics = read_json(run.stage_dir("report") / METRICS_FILE)
    print_metrics(run, say)
    seconds = time.perf_counter() - t0
    ran = [s for s, v in outcome.items() if v == "ran"]
    what = ("ran " + ", ".join(ran) if ran else
            "nothing to do (every stage done; --redo STAGE runs one again)")
    say(f"t3s demo: {what} in {seconds:.0f} s")
    return metrics
