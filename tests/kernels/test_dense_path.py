"""The dense path of small CPU problems (`t3s_kernels.dense`) against the streaming path.

With the backend left automatic, a CPU problem of at most DENSE_MACS multiply-adds runs on
materialised logits: same checks, loss, reductions, statistics and gradients as the
kernels (here the 'torch' reference, float64), and the choice is logged.
"""

import logging

import pytest
import torch
from kernel_helpers import make_case

from t3s_kernels import dense, linear_cross_entropy, target_logprobs

N, H, V = 23, 16, 97  # 35,696 multiply-adds: the dense path
OPTIONS = {
    "plain": {},
    "bias_weights": {"bias": True, "weights": True},
    "smoothing_zloss_softcap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
    "normalizer": {"normalizer": 7.0, "reduction": "sum"},
}


def _case(dtype, opts):
    hidden, weight, targets, bias = make_case(N, H, V, dtype, torch.device("cpu"),
                                              bias=opts.get("bias", False), ignore_frac=0.2)
    if opts.get("weights"):
        mask = torch.rand(N, dtype=torch.float64).to(dtype) * (torch.rand(N) > 0.3)
    else:
        mask = torch.rand(N) > 0.3
    kw = {k: v for k, v in opts.items() if k not in ("bias", "weights")}
    return hidden, weight, targets, bias, mask, kw


def _run(hidden, weight, targets, bias, mask, kw, backend, reduction):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss, stats = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                       return_stats=True, backend=backend,
                                       **{"reduction": reduction, **kw})
    upstream = torch.rand_like(loss) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)
    (loss * upstream).sum().backward()
    grads = [None if t is None else t.grad.clone() for t in (hidden, weight, bias)]
    return loss.detach(), stats, grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_dense_path_matches_the_reference(case, reduction):
    assert N * V * H <= dense.DENSE_MACS
    opts = dict(OPTIONS[case])
    reduction = opts.pop("reduction", reduction)
    hidden, weight, targets, bias, mask, kw = _case(torch.float64, opts)
    torch.manual_seed(0)
    got = _run(hidden, weight, targets, bias, mask, kw, None, reduction)
    torch.manual_seed(0)
    exp = _run(hidden, weight, targets, bias, mask, kw, "torch", reduction)
    torch.testing.assert_close(got[0], exp[0], rtol=1e-10, atol=1e-12)
    for name in ("lse", "target_logprob", "entropy"):
        torch.testing.assert_close(getattr(got[1], name), getattr(exp[1], name).to(
            getattr(got[1], name).dtype), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(got[1].argmax_correct, exp[1].argmax_correct)
    for g, e in zip(got[2], exp[2]):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_path_low_precision_and_dropped_nan_rows(dtype):
    """A dropped row may hold NaN: it never enters the matmul, its gradient is 0."""
    hidden, weight, targets, bias, mask, kw = _case(dtype, {"bias": True})
    with torch.no_grad():
        hidden[~mask] = float("nan")
    got = _run(hidden, weight, targets, bias, mask, kw, None, "mean")
    exp = _run(hidden, weight, targets, bias, mask, kw, "cpp", "mean")
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got[0])
    torch.testing.assert_close(got[0], exp[0], **tol)
    for g, e in zip(got[2], exp[2]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), e.float(), **tol)
    assert (got[2][0][~mask] == 0).all()


def test_dense_target_logprobs_match_the_kernels():
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, torch.device("cpu"),
                                              bias=True, ignore_frac=0.3, requires_grad=False)
    got = target_logprobs(hidden, weight, targets, bias=bias, softcap=3.0, return_entropy=True,
                          return_argmax=True)
    exp = target_logprobs(hidden, weight, targets, bias=bias, softcap=3.0, return_entropy=True,
                          return_argmax=True, backend="cpp")
    torch.testing.assert_close(got.logprobs, exp.logprobs, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.entropy, exp.entropy, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(got.argmax, exp.argmax)


def test_bad_input_on_the_dense_path_is_the_same_error():
    hidden, weight, targets, _, mask, _ = _case(torch.float32, {})
    bad = targets.clone()
    bad[2] = V
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="outside"):
        target_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="loss_mask"):
        linear_cross_entropy(hidden, weight, targets, loss_mask=torch.full((N,), -1.0))


def test_every_token_dropped_on_the_dense_path():
    hidden, weight, targets, _, _, _ = _case(torch.float32, {})
    mask = torch.zeros(N, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        loss = linear_cross_entropy(hidden, weight, targets, loss_mask=mask, reduction=reduction)
        assert (loss == 0).all()
        loss.sum().backward()
        assert (hidden.grad == 0).all() and (weight.grad == 0).all()
        hidden.grad = weight.grad = None


def test_the_choice_is_logged_and_large_problems_stream(caplog):
    hidden, weight, targets, _, _, _ = _case(torch.float32, {})
    with caplog.at_level(logging.DEBUG, logger="t3s_kernels"):
        target_logprobs(hidden, weight, targets)
    assert any("dense PyTorch path" in r.getMessage() for r in caplog.records)
    caplog.clear()
    big_h = torch.randn(64, 128)
    big_w = torch.randn(dense.DENSE_MACS // (64 * 128) + 1, 128)
    assert not dense.preferred(big_h, big_w)
    with caplog.at_level(logging.DEBUG, logger="t3s_kernels"):
        target_logprobs(big_h, big_w, torch.zeros(64, dtype=torch.long))
    assert not any("dense PyTorch path" in r.getMessage() for r in caplog.records)
    assert any("backend 'cpp'" in r.getMessage() for r in caplog.records)
