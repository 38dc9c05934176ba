"""What the ``t3s`` command and the demo print, shared by both.

`say` prints one progress line; `print_metrics` prints a finished report's
headline numbers; `show_progress` decides whether progress bars are drawn;
`quiet_libraries` turns transformers' warnings and download bars off.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from .report import METRIC_KEYS
from .rundir import METRICS_FILE, REPORT_FILE, RunDir, read_json

__all__ = ["say", "print_metrics", "show_progress", "quiet_libraries"]


def say(msg: str) -> None:
    """Print a progress line now (stdout, flushed)."""
    print(msg, flush=True)


def print_metrics(run: RunDir, say: Callable[[str], None] = say) -> None:
    """The report's `METRIC_KEYS` on one line and where the report is (nothing when
    the run has no report)."""
    path = run.stage_dir("report") / METRICS_FILE
    if not path.is_file():
        return
    m = read_json(path)

    def fmt(x):
        return "n/a" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    say("t3s: " + ", ".join(f"{k} {fmt(m.get(k))}" for k in METRIC_KEYS))
    say(f"t3s: report in {run.stage_dir('report') / REPORT_FILE}")


def show_progress(setting: Optional[bool]) -> bool:
    """Whether to draw progress bars: the ``progress`` setting when given (``--progress``
    / ``--no-progress``), else whether stderr (where tqdm draws) is a terminal, so
    that a redirected log holds no bar fragments."""
    if setting is not None:
        return bool(setting)
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def quiet_libraries(progress: bool, debug: bool) -> None:
    """transformers' warnings off unless ``debug``; its per-file download bars off
    unless ``progress``. vLLM (``--engine vllm``), which logs every engine step at INFO,
    logs errors only unless ``debug`` (``VLLM_LOGGING_LEVEL``, read when vLLM is first
    imported; a value already set is kept)."""
    if not debug:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    if not debug:
        hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
