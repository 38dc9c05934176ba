"""Deprecated location (kept for one release): the store is `t3s.trajectory.store`."""

from .trajectory.store import *  # noqa: F401,F403
from .trajectory.store import __all__  # noqa: F401
