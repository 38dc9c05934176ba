"""The report of a T3S run: ``metrics.json``, ``report.md`` and their figures.

Modules, lowest first (each imports only those above it):

* `plots`: the figures, from plain data (`plot_shock`, `plot_delta_histogram`,
  `plot_traces`).
* `arms`: the extra arms (``--arms``): their numbers, labels and descriptions.
* `metrics`: the numbers of a run (`collect_metrics`, `METRIC_KEYS`), read from its
  run directory (`stage_history`, `stage_summary`), and the paths a report shows
  (`shown_path`, `demo_writeup`).
* `markdown`: ``report.md``'s text from those numbers (`render_markdown`).
* `sensitivity`: the sensitivity stage's figure and section.
* `diagnostics`: the analyze stage's section (``analysis.md``).
* `build`: `build_report`, which writes the figures, ``metrics.json`` and ``report.md``.

The report of a run with ``objective: diffusion`` is `t3s.dllm.report`.

This package module re-exports the names below.
"""

from .build import build_report
from .markdown import render_markdown
from .metrics import (METRIC_KEYS, collect_metrics, demo_writeup, shown_path, stage_history,
                      stage_summary)

__all__ = [
    "METRIC_KEYS",
    "build_report",
    "collect_metrics",
    "render_markdown",
    "shown_path",
    "demo_writeup",
    "stage_history",
    "stage_summary",
]
