"""Start a test's worker on 2 gloo processes (torch.multiprocessing, spawn) and collect
their failures: `free_port`, `run_two_ranks`."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker, *args, timeout: float = 240, what: str = "") -> None:
    """``worker(rank, port, *args, errors)`` on ranks 0 and 1; AssertionError with every
    rank's traceback (the worker puts it on ``errors``) or exit status when one fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, *args, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in procs] == [0, 0], what
