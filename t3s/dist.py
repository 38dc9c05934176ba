"""The few collectives the method and the pipeline use across launcher ranks.

Everything here is a no-op in one process (no ``torch.distributed`` process
group, or a group of one), so the callers need no separate single-process path.
Under ``torchrun`` / ``accelerate launch`` every rank calls the same functions
in the same order.

* `world_size`, `rank`, `is_main`: the process group's, else 1, 0, True.
* `barrier`, `broadcast_object` (rank 0's value on every rank),
  `gather_objects` (every rank's value, in rank order, on every rank).
* `on_main`: run a function on rank 0 only and give its result, or raise its
  error, on every rank (the copies carry ``from_main = True``, so that only
  rank 0 prints the message).
* `rank_share`: this rank's share of ``n`` items (item i goes to rank i mod W),
  so that a pass split across ranks visits every item exactly once.
* `main_only`: a function on rank 0, a no-op on the others (what prints).
* `is_sharded`: whether each forward of a model is a collective (FSDP, ZeRO-3).
* `init_from_launcher`: join the launcher's process group (gloo on CPU, NCCL
  and gloo on CUDA) when ``WORLD_SIZE`` > 1; `shutdown`: leave it at the end.
"""

from __future__ import annotations

import datetime
import os
import pickle
from typing import Any, Callable, List, Optional, TypeVar

__all__ = ["world_size", "rank", "is_main", "barrier", "broadcast_object", "gather_objects",
           "on_main", "main_only", "rank_share", "is_sharded", "launched_world_size",
           "init_from_launcher", "shutdown", "DEFAULT_TIMEOUT_S"]

T = TypeVar("T")

#: how long a rank waits in a collective for the others (``T3S_DIST_TIMEOUT_S``
#: overrides): the rank-0-only stages (analyze, report) run while the others wait
DEFAULT_TIMEOUT_S = 3600


def _group_ready() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    if not _group_ready():
        return 1
    import torch.distributed as dist
    return dist.get_world_size()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    if not _group_ready():
        return 0
    import torch.distributed as dist
    return dist.get_rank()


def is_main() -> bool:
    """Whether this is rank 0 (True in one process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if world_size() > 1:
        import torch.distributed as dist
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; ``obj`` itself in one process)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 only; its result on every rank.

    When it raises, every rank raises: rank 0 the error itself, the others a
    copy with ``from_main = True`` (the command then prints it once). In one
    process this is a plain call."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome = None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # every rank must leave the collective below together
            outcome = ("error", _portable(exc))
            broadcast_object(outcome)
            raise
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        exc = outcome[1]
        exc.from_main = True
        raise exc
    return outcome[1]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles and unpickles, else a RuntimeError with its message."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` on rank 0; on the other ranks a function that does nothing (rank 0 prints
    for every rank)."""
    return fn if is_main() else _nothing


def _nothing(*args, **kwargs) -> None:
    """`main_only`'s stand-in on the ranks other than 0."""


def is_sharded(model) -> bool:
    """Whether a parameter of ``model`` is a DTensor (FSDP2) or a DeepSpeed ZeRO-3
    partition (``ds_id``), or a module an FSDP1 wrapper: each forward is then a
    collective every rank must join."""
    if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters()):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def rank_share(n: int, *, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """Indices of this rank's share of ``n`` items: ``range(rank, n, world)``."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    return range(r, int(n), w)


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by a launcher (torchrun, accelerate launch), else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def init_from_launcher(device: str = "cpu", timeout_s: Optional[float] = None) -> bool:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1 and none exists yet.

    device: "cpu" (gloo) or "cuda" (NCCL for CUDA tensors and gloo for CPU
    ones, as accelerate sets up for FSDP's CPU state dicts; this process's GPU
    is ``LOCAL_RANK``). timeout_s: the collectives' timeout (default
    ``T3S_DIST_TIMEOUT_S`` or `DEFAULT_TIMEOUT_S`). Returns whether this
    process runs under a launcher with more than one rank."""
    if launched_world_size() == 1:
        return False
    if _group_ready():
        return True
    import torch
    import torch.distributed as dist
    if timeout_s is None:
        timeout_s = float(os.environ.get("T3S_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    backend = "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cuda:nccl,cpu:gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group after a command's last collective: a barrier, so that no
    rank tears its communication threads down while another still uses them, then
    ``destroy_process_group`` (an interpreter exit with gloo's threads alive can
    abort). A no-op without a process group."""
    if not _group_ready():
        return
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
