"""Deprecated location (kept for one release): use `t3s.weights`.

``from t3s.rrt import save_rrt`` keeps working; ``t3s.rrt`` itself is the function
`t3s.weights.rrt`, not this module.
"""

from .weights import StateSource, load_state_dict, rrt, save_rrt  # noqa: F401

__all__ = ["rrt", "save_rrt", "load_state_dict"]
