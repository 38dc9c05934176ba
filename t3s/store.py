"""Deprecated location (kept for one release): the store is `t3s.trajectory.store`,
its queries `t3s.trajectory.queries`."""

from .trajectory.store import *  # noqa: F401,F403
from .trajectory.store import (  # noqa: F401  (names the old module had beyond its __all__)
    BASE_COLUMNS,
    BASE_FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_COLUMNS,
    MANIFEST_NAME,
    PathLike,
    __all__,
)
