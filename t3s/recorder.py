"""Deprecated location (kept for one release): the recorder is `t3s.trajectory.recorder`."""

from .trajectory.recorder import *  # noqa: F401,F403
from .trajectory.recorder import __all__  # noqa: F401
