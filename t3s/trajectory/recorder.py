"""Records each trained token's log p(y_t) at every step, at (almost) no cost.

The fused loss already computes log p(y_t) = z_y - lse for every token it
trains on (`t3s_kernels.linear_cross_entropy(..., return_stats=True)`).
`TrajectoryRecorder.record` takes those values with the batch's labels and
example ids, and a background thread maps them to token keys and appends them
to a trajectory-store shard (`t3s.trajectory.writer`). c_t(theta_b) is then the visit nearest step b, with no
checkpoint saved.

Token keys (shared convention): ``(example_id int64, position int32)``, where
`position` is the index in the example's ``input_ids`` of the *target* token.
With Hugging Face labels (aligned to ``input_ids``, shifted inside the loss),
the logit at hidden index i predicts ``labels[i + 1]``: key position i + 1.

Padded (right or left) and packed batches are mapped to keys by
`t3s.data.token_keys`, which documents the layouts. Only targets with
``label != ignore_index``, a predecessor in the same sequence, and a finite
value are recorded (the fused loss gives NaN for tokens it dropped, e.g.
anchors masked out during T3S retraining).

Cost. `record` only validates shapes and enqueues: on CUDA it issues
``non_blocking`` copies into pinned host memory plus a CUDA event, and performs
no host synchronisation (pass `step` as a Python int). The mapping and the
write happen on the background thread after the event completes. A full queue
(`max_queue` steps in flight) makes `record` wait, which bounds host memory.
On CPU the tensors are cloned, so the caller may reuse them.
"""

from __future__ import annotations

import queue
import threading
import warnings
import weakref
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .._util import to_numpy
from ..data.keys import token_keys
from .shards import PathLike
from .writer import TrajectoryWriter

__all__ = ["TrajectoryRecorder"]

_STOP = object()


class _Item:
    __slots__ = ("step", "values", "labels", "example_ids", "position_ids", "attention_mask",
                 "extras", "events")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _to_host(x, cuda_devices: set):
    """Start a device->host copy (pinned, non_blocking on CUDA); CPU data is copied.

    The CUDA devices copied from are added to `cuda_devices`.
    """
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type == "cuda":
            # Pinned buffers come from PyTorch's caching host allocator.
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            buf.copy_(x, non_blocking=True)
            cuda_devices.add(x.device)
            return buf
        if x.device.type != "cpu":
            return x.to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            return x.float().numpy()
        # A numpy copy is a plain single-threaded memcpy: no intra-op thread pool
        # wake-up, which can cost milliseconds on a busy machine.
        return x.numpy().copy()
    return np.array(x, copy=True)


class TrajectoryRecorder:
    """Writes per-token log-probs of every training step to a trajectory store.

    Args:
        store: a directory (a `TrajectoryWriter` is opened on it with the keyword
            arguments below) or an open `TrajectoryWriter` (then owned and
            closed by the recorder).
        dataset_fingerprint, tokenizer_fingerprint, model_id, rank, world_size,
        extra_columns, fsync, mode, metadata: passed to `TrajectoryWriter`.
        max_queue: steps that may wait for the writer thread before `record`
            blocks.
        ignore_index: label value of tokens outside the loss.

    Use as a context manager or call `close()`: it drains the queue and closes
    the shard. An exception in the writer thread is raised (as ``RuntimeError``
    chained to the original) by the next `record`, `flush` or `close`. Records
    still queued when the process is killed are lost (at most `max_queue`
    steps); each record that reached the file is complete.
    """

    def __init__(self, store: Union[PathLike, TrajectoryWriter], *,
                 dataset_fingerprint: Optional[str] = None, tokenizer_fingerprint: str = "",
                 model_id: str = "", rank: Optional[int] = None,
                 world_size: Optional[int] = None,
                 extra_columns: Sequence[str] = (), fsync: bool = False, mode: str = "append",
                 metadata: Optional[Mapping[str, Any]] = None, max_queue: int = 8,
                 ignore_index: int = -100):
        if isinstance(store, TrajectoryWriter):
            self.writer = store
        else:
            if dataset_fingerprint is None:
                raise ValueError("dataset_fingerprint is required to open a trajectory store")
            self.writer = TrajectoryWriter(
                store, dataset_fingerprint=dataset_fingerprint,
                tokenizer_fingerprint=tokenizer_fingerprint, model_id=model_id, rank=rank,
                world_size=world_size, extra_columns=extra_columns, fsync=fsync, mode=mode, metadata=metadata)
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.extra_columns = self.writer.extra_columns
        self.ignore_index = int(ignore_index)
        self.steps_recorded = 0
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_queue)
        self._error: Optional[BaseException] = None
        self._error_reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="t3s-trajectory-writer",
                                        daemon=True)
        self._thread.start()
        # Runs at interpreter exit if close() was never called (the thread keeps
        # the recorder alive until then).
        self._finalizer = weakref.finalize(self, _close_quietly, self._queue, self._thread,
                                           self.writer)

    # ------------------------------------------------------------------ not a callback
    def on_init_end(self, *args, **kwargs):
        """A Trainer calls this on its callbacks: say what to pass instead."""
        raise TypeError(
            "a TrajectoryRecorder is not a Trainer callback: pass "
            "callbacks=[t3s.TrajectoryCallback(store_dir)] (or "
            "t3s.TrajectoryCallback(recorder=this_recorder)) to record in a Trainer")

    on_train_begin = on_init_end

    # ------------------------------------------------------------------ producer side
    def record(self, step: int, values, labels, example_ids, *, position_ids=None,
               attention_mask=None, extras: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Queue one step's per-token values.

        Args:
            step: the optimizer step whose parameters produced the values
                (0 = before any update), a Python int.
            values: float tensor [B, T-1] or [B, T] (hidden index i predicts
                labels[:, i+1]; a last column is ignored), or a
                `t3s_kernels.TokenStats` (its ``target_logprob``, and its fields
                named like the store's extra columns). NaN entries are skipped.
            labels: [B, T] Hugging Face labels aligned to input_ids.
            example_ids: [B] (padded) or [num_sequences] (packed) int64.
            position_ids, attention_mask: optional [B, T]; see `t3s.data.token_keys`.
            extras: {column: tensor shaped like values} for the extra columns.
        """
        if self._closed:
            raise RuntimeError("the recorder is closed")
        self._raise_if_failed()
        if isinstance(step, torch.Tensor):
            raise TypeError("step must be a Python int (a tensor would force a host sync)")
        extras = dict(extras or {})
        if hasattr(values, "target_logprob"):  # TokenStats
            for name in self.extra_columns:
                if name not in extras and hasattr(values, name):
                    extras[name] = getattr(values, name)
            values = values.target_logprob
        if set(extras) != set(self.extra_columns):
            raise ValueError(f"extras must be exactly the store's extra columns "
                             f"{list(self.extra_columns)}, got {sorted(extras)}")
        lab_shape = tuple(labels.shape)
        if len(lab_shape) == 1:
            lab_shape = (1,) + lab_shape
        v_shape = tuple(values.shape)
        if len(v_shape) == 1:
            v_shape = (1,) + v_shape
        if (len(lab_shape) != 2 or len(v_shape) != 2 or v_shape[0] != lab_shape[0]
                or v_shape[1] not in (lab_shape[1] - 1, lab_shape[1])):
            raise ValueError(f"values must be [B, T-1] or [B, T] for labels [B, T]; got values "
                             f"{tuple(values.shape)} and labels {tuple(labels.shape)}")
        for name, x in extras.items():
            if tuple(x.shape) != tuple(values.shape):
                raise ValueError(f"extra {name!r} has shape {tuple(x.shape)}, expected "
                                 f"{tuple(values.shape)}")
        cuda_devices: set = set()
        host = {name: _to_host(x, cuda_devices) for name, x in (
            ("values", values), ("labels", labels), ("example_ids", example_ids),
            ("position_ids", position_ids), ("attention_mask", attention_mask))}
        host_extras = {name: _to_host(x, cuda_devices) for name, x in extras.items()}
        events = []
        for dev in cuda_devices:  # the copies were queued on each device's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))
            events.append(event)
        self._queue.put(_Item(step=int(step), extras=host_extras, events=events, **host))
        self.steps_recorded += 1

    @property
    def closed(self) -> bool:
        """True once `close` has been called (no more steps can be recorded)."""
        return self._closed

    def rewind(self, before_step: int) -> int:
        """Drop the store's records of step >= ``before_step`` (a run resumed from its
        checkpoint at that step records them again); returns the rows dropped.
        Waits for the queued steps first."""
        self.flush()
        return self.writer.rewind(before_step)

    def flush(self) -> None:
        """Wait until every queued step is written."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Drain the queue, stop the thread, close the shard (idempotent)."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            _close_quietly(self._queue, self._thread, self.writer)
        if self._error is not None and not self._error_reported:
            self._raise_if_failed()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception already propagating
            self.close()
        except RuntimeError as e:
            warnings.warn(f"trajectory recorder: {e}", RuntimeWarning)

    @property
    def rows_written(self) -> int:
        """Rows the writer has appended so far (the background thread may be behind `record`)."""
        return self.writer.rows_written

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._error_reported = True
            raise RuntimeError(f"the trajectory writer thread failed: "
                               f"{type(self._error).__name__}: {self._error}") from self._error

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:  # after a failure, drain without writing
                    self._write(item)
            except BaseException as e:  # surfaced on the next call
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, item: _Item) -> None:
        for event in item.events:
            event.synchronize()
        rows, cols, eid, pos = token_keys(item.labels, item.example_ids,
                                          position_ids=item.position_ids,
                                          attention_mask=item.attention_mask,
                                          ignore_index=self.ignore_index)
        lp = _gather(item.values, rows, cols)
        keep = np.isfinite(lp)
        extra = {name: _gather(x, rows, cols)[keep] for name, x in item.extras.items()}
        self.writer.append(item.step, eid[keep], pos[keep], lp[keep], **extra)


def _gather(x, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x[rows, cols] as float32 for x [B, W] or [W] (tensor or array)."""
    x = to_numpy(x, np.float32)
    if x.ndim == 1:
        x = x[None]
    return x[rows, cols]


def _close_quietly(q: "queue.Queue", thread: threading.Thread, writer: TrajectoryWriter) -> None:
    if thread.is_alive():
        q.put(_STOP)
        thread.join()
    writer.close()
