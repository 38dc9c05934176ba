"""Deprecated location (kept for one release): use `t3s.profiling` (`profile`) and
`t3s.delta` (`online_delta`, `exact_delta`, `compare_deltas`, `Agreement`).

``from t3s.profile import online_delta`` keeps working; ``t3s.profile`` itself is
the function `t3s.profiling.profile`, not this module.
"""

from .delta import Agreement, compare_deltas, exact_delta, online_delta  # noqa: F401
from .profiling import profile  # noqa: F401

__all__ = ["profile", "online_delta", "exact_delta", "compare_deltas", "Agreement"]
