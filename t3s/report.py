"""Deprecated: the report moved to `t3s.pipeline.report`, its figures to
`t3s.pipeline.plots`.

This module re-exports their public names for one release.
"""

from .pipeline.plots import (ANCHOR_COLOR, KEPT_COLOR, plot_delta_histogram, plot_shock,
                             plot_traces)
from .pipeline.report import METRIC_KEYS, build_report, collect_metrics, render_markdown

__all__ = ["METRIC_KEYS", "build_report", "collect_metrics", "render_markdown", "plot_shock",
           "plot_delta_histogram", "plot_traces", "ANCHOR_COLOR", "KEPT_COLOR"]
