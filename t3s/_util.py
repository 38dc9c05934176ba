"""Small helpers shared across t3s's modules (no t3s imports: any module may use them).

- `to_numpy`: a tensor, array or sequence as a numpy array (bf16/fp16 tensors upcast).
- `canonical_json` / `sha256_json`: the stable hash of a JSON-able object.
- `one_line`: an exception's message on one line, for log lines and CLI errors.
"""

from __future__ import annotations

import contextlib
import math
import hashlib
import json
from typing import Any, Optional, Sequence, Tuple

import numpy as np

__all__ = ["to_numpy", "canonical_json", "sha256_json", "one_line"]


def to_numpy(x: Any, dtype: Optional[Any] = None) -> np.ndarray:
    """``x`` (torch tensor on any device, numpy array, sequence) as a numpy array.

    A tensor is detached and moved to the CPU; bfloat16 / float16 become float32
    (numpy has no bfloat16). With ``dtype`` the result is cast to it.
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor, without importing torch
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON; values JSON cannot hold are written with ``str``."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)


def sha256_json(obj: Any) -> str:
    """sha256 hex digest of `canonical_json` (equal objects hash equal)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def one_line(exc: BaseException) -> str:
    """The exception's message with its lines joined (its type name when empty)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures go to files)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("t3s figures need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, restored after it (the demos
    and tests run inside a caller's process, whose setting they must not change)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mean_and_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """The mean of ``values`` (at least one) and its standard error: the sample standard
    deviation (ddof=1) over sqrt(n); None with fewer than two values."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else None
    return mean, se
