"""Vocab-parallel loss and log-probs on 2 gloo processes equal the unsharded ones.

The test starts its own 2 processes (torch.multiprocessing, spawn). Each rank holds an
uneven block of the head's rows (V = 37: 19 + 18), the same hidden states and targets,
and compares the loss, every statistic, grad_hidden and its own shard's grad_weight and
grad_bias with a single-process float64 reference.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_two_ranks

N, H, V = 23, 16, 37
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:3] = -100
    mask = torch.rand(N, generator=g) * (torch.rand(N, generator=g) > 0.25)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets, mask


def _worker(rank, port, seed, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from t3s_kernels import linear_cross_entropy, target_logprobs
        from t3s_kernels.vocab_parallel import (vocab_parallel_cross_entropy,
                                                vocab_parallel_target_logprobs)
        group = dist.group.WORLD
        rows = slice(0, 19) if rank == 0 else slice(19, V)
        options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, reduction="mean")
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, bias, targets, mask = _inputs(seed, dtype)
            # the float64 reference, unsharded
            h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
            ref, ref_stats = linear_cross_entropy(h64, w64, targets, bias=b64, loss_mask=mask.double(),
                                                  backend="torch", return_stats=True, **options)
            ref.backward()
            # this rank's shard
            h = hidden.clone().requires_grad_()
            w = weight[rows].clone().requires_grad_()
            b = bias[rows].clone().requires_grad_()
            loss, stats = vocab_parallel_cross_entropy(h, w, targets, vocab_group=group, bias=b,
                                                       loss_mask=mask.to(dtype), return_stats=True,
                                                       **options)
            loss.backward()
            tol = TOL[dtype]
            torch.testing.assert_close(loss.double(), ref.detach(), **tol)
            torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
            torch.testing.assert_close(w.grad.double(), w64.grad[rows], **tol)
            torch.testing.assert_close(b.grad.double(), b64.grad[rows], **tol)
            for got, want in zip(stats[:2], ref_stats[:2]):
                torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **tol)
            if dtype == torch.float32:
                assert torch.equal(stats.argmax_correct, ref_stats.argmax_correct)
            lp = vocab_parallel_target_logprobs(hidden, weight[rows], targets, vocab_group=group,
                                                bias=bias[rows], return_entropy=True,
                                                return_argmax=True)
            ref_lp = target_logprobs(hidden.double(), weight.double(), targets,
                                     bias=bias.double(), return_entropy=True, return_argmax=True,
                                     backend="torch")
            torch.testing.assert_close(lp.logprobs.double(), ref_lp.logprobs.double(),
                                       equal_nan=True, **tol)
            torch.testing.assert_close(lp.entropy.double(), ref_lp.entropy.double(),
                                       equal_nan=True, **tol)
            if dtype == torch.float32:
                assert torch.equal(lp.argmax, ref_lp.argmax)
        # a Shard(0) DTensor weight (torch's own uneven split) gives the same loss
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (2,))
        hidden, weight, bias, targets, mask = _inputs(seed, torch.float32)
        wd = distribute_tensor(weight.clone().requires_grad_(), mesh, [Shard(0)])
        loss = vocab_parallel_cross_entropy(hidden, wd, targets, loss_mask=mask)
        ref = linear_cross_entropy(hidden, weight, targets, loss_mask=mask, backend="torch")
        torch.testing.assert_close(loss, ref, **TOL[torch.float32])
        loss.backward()
        w_ref = weight.clone().requires_grad_()
        linear_cross_entropy(hidden, w_ref, targets, loss_mask=mask, backend="torch").backward()
        torch.testing.assert_close(wd.grad.full_tensor(), w_ref.grad, **TOL[torch.float32])
        # second derivatives are refused with a clear error, never silently wrong
        h = hidden.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(h, weight[rows], targets, vocab_group=group)
        try:
            torch.autograd.grad(loss, h, create_graph=True)
        except NotImplementedError as exc:
            assert "second derivatives" in str(exc)
        else:
            raise AssertionError("a create_graph backward was accepted")
        # bad input: a label beyond the whole vocabulary, on every rank alike
        bad = targets.clone()
        bad[5] = V
        try:
            vocab_parallel_cross_entropy(hidden, weight[rows], bad, vocab_group=group)
        except ValueError as exc:
            assert "outside [0, V=37)" in str(exc)
        else:
            raise AssertionError("an out-of-range label was accepted")
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    # gloo's worker threads can abort a normal interpreter exit; every check is done
    os._exit(0)


def test_vocab_parallel_matches_unsharded_on_two_ranks():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    run_two_ranks(_worker, seed, timeout=180, what=f"seed {seed}")


def test_vocab_parallel_needs_a_group():
    from t3s_kernels.vocab_parallel import vocab_parallel_cross_entropy
    hidden, weight, _, targets, _ = _inputs(0, torch.float32)
    with pytest.raises(ValueError, match="vocab_group"):
        vocab_parallel_cross_entropy(hidden, weight, targets)
