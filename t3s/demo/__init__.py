"""The embedded demo: Imitation Shock and T3S on a task that runs on 2 CPU cores.

* `t3s.demo.task`: sums of two-digit numbers (``23+45+12=``), a direct answer
  style (``\\boxed{80}``) and a rule-based teacher's step-by-step style
  (``23+45=68;68+12=80;\\boxed{80}``), seeded generators, hash-based
  train/held-out split, JSONL writer.
* `t3s.demo.model`: the char-level tokenizer, the ~0.86M-parameter Llama
  config, loading the shipped base student θ0 (``assets/base``, built by
  ``scripts/build_demo_base.py``) and batched greedy generation.
* `t3s.demo.experiment`: `run_experiment`, the whole pipeline as a library
  call (pilot SFT with online log-prob recording, bottleneck, Δc, anchor
  mask, T3S / random-mask retraining, evaluation).
"""

from .experiment import DemoConfig, DemoResult, run_experiment
from .model import BASE_DIR, PARAM_COUNT, build_tokenizer, load_base
from .task import Problem

__all__ = ["DemoConfig", "DemoResult", "run_experiment", "BASE_DIR", "PARAM_COUNT", "build_tokenizer",
           "load_base", "Problem"]
