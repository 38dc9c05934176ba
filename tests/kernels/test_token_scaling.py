"""token_scaling=True (DFT) against a float64 reference: loss and every gradient.

Each kept token's loss l_t is multiplied by the stop-gradient target probability
p_t = exp(z_y - lse) of its (softcapped) logits; weights, ignore_index and the reductions'
denominators are unchanged. Every CPU path runs: the 'torch' reference, the C++ kernels
and the Triton kernels (through the interpreter, tests/conftest.py), each in the one-pass
gradient-in-forward mode and the deferred backward, plus the dense path of small CPU
problems (backend=None). Kernel outputs start NaN-poisoned (conftest).
"""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from kernel_helpers import assert_close64, gemm_term_scales, make_case, naive_lce64

import t3s
import t3s_kernels
from t3s_kernels import debug, dense, linear_cross_entropy
from t3s_kernels.backends import get_backend

N, H, V = 37, 19, 101  # odd sizes: no dimension is a multiple of a block

# (backend, mode): 'one_pass' computes the gradient in the forward for 'mean' / 'sum'
# ('none' always defers); 'deferred' forces the forward + separate backward.
PATHS = ([("torch", "one_pass"), ("torch", "deferred")]
         + ([("cpp", "one_pass"), ("cpp", "deferred")] if "cpp" in BACKENDS else [])
         + ([("triton", "one_pass"), ("triton", "deferred")] if "triton" in BACKENDS else [])
         + [(None, "dense")])

EVERYTHING = {"mask": True, "ignore_frac": 0.2, "bias": True, "softcap": 5.0,
              "label_smoothing": 0.1, "z_loss": 1e-3}
CASES = {
    "mean_weights": {"mask": True, "ignore_frac": 0.2, "bias": True},
    "sum_everything": {**EVERYTHING, "reduction": "sum"},
    "normalizer_smoothing": {"mask": True, "ignore_frac": 0.2, "label_smoothing": 0.1,
                             "normalizer": 23.0},
    "none_everything": {**EVERYTHING, "reduction": "none"},
}


def _inputs(dtype, opts, n=N, h=H, v=V):
    hidden, weight, targets, bias = make_case(
        n, h, v, dtype, DEVICE, bias=opts.get("bias", False),
        ignore_frac=opts.get("ignore_frac", 0.0))
    loss_mask = None
    if opts.get("mask"):  # float weights in (0, 2), about a quarter of them 0
        loss_mask = torch.rand(targets.shape, device=DEVICE) * 2.0 + 0.01
        loss_mask[torch.rand(targets.shape, device=DEVICE) < 0.25] = 0.0
    kw = dict(bias=bias, loss_mask=loss_mask, ignore_index=-100,
              reduction=opts.get("reduction", "mean"), normalizer=opts.get("normalizer"),
              label_smoothing=opts.get("label_smoothing", 0.0), softcap=opts.get("softcap"),
              z_loss=opts.get("z_loss", 0.0))
    return hidden, weight, targets, kw


def _set_mode(backend, mode, reduction, monkeypatch):
    if mode == "deferred":
        monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)
    if backend == "cpp":  # several row blocks, so each block scales its own coefficients
        monkeypatch.setitem(debug.OVERRIDES, "cpu_block", (8, 32))
    if mode == "one_pass" and backend in ("cpp", "triton") and reduction != "none":
        # the kernels' own one-pass implementation, never the forward + deferred backward
        # ('none' always defers: its per-token grad_output is known only in the backward)
        def no_deferred_backward(*args, **kwargs):
            raise AssertionError("the one-pass path ran the deferred backward")
        monkeypatch.setattr(get_backend(backend), "loss_backward", no_deferred_backward)


def _check(backend, dtype, hidden, weight, targets, kw, **extra):
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend, token_scaling=True,
                                filter_eps=None, **kw, **extra)
    ref, (h64, w64, b64), logits64 = naive_lce64(hidden, weight, targets, keep_logits=True,
                                                 token_scaling=True, **kw)
    # A random per-token grad_output for 'none' checks that it is honoured token by token.
    grad_out = torch.randn_like(ref) if kw["reduction"] == "none" else torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype).to(loss.device))
    ref.backward(grad_out)
    assert loss.dtype == torch.float32
    assert_close64(loss, ref, torch.float32, "loss")
    scale_h, scale_w = gemm_term_scales(h64, w64, logits64)
    assert_close64(hidden.grad, h64.grad, dtype, "grad_hidden", term_scale=scale_h)
    assert_close64(weight.grad, w64.grad, dtype, "grad_weight", term_scale=scale_w)
    if kw["bias"] is not None:
        assert_close64(kw["bias"].grad, b64.grad, dtype, "grad_bias")
    return loss


@pytest.mark.parametrize("backend,mode", PATHS, ids=[f"{b or 'auto'}-{m}" for b, m in PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_token_scaling_matches_float64(backend, mode, dtype, case, monkeypatch):
    _set_mode(backend, mode, CASES[case].get("reduction", "mean"), monkeypatch)
    hidden, weight, targets, kw = _inputs(dtype, CASES[case])
    if mode == "dense":
        assert hidden.shape[0] * V * H <= dense.DENSE_MACS  # the dense auto path
    _check(backend, dtype, hidden, weight, targets, kw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not importable")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_one_pass_over_several_chunks(reduction, monkeypatch):
    """buffer_bytes small enough that the one-pass Triton loss runs in row chunks: each
    chunk scales its own coefficients."""
    _set_mode("triton", "one_pass", reduction, monkeypatch)
    hidden, weight, targets, kw = _inputs(torch.float32, {**EVERYTHING, "reduction": reduction},
                                          v=1000)
    _check("triton", torch.float32, hidden, weight, targets, kw, buffer_bytes=2**16)


@pytest.mark.parametrize("backend", [b for b, m in PATHS if m != "deferred"],
                         ids=lambda b: b or "auto")
def test_stats_stay_unscaled(backend):
    """The statistics of a token-scaled loss are those of the plain loss."""
    hidden, weight, targets, kw = _inputs(torch.float32, EVERYTHING)
    _, plain = linear_cross_entropy(hidden, weight, targets, backend=backend, return_stats=True,
                                    **kw)
    _, scaled = linear_cross_entropy(hidden, weight, targets, backend=backend, return_stats=True,
                                     token_scaling=True, **kw)
    for name, a, b in zip(plain._fields, plain, scaled):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", [b for b, m in PATHS if m != "deferred"],
                         ids=lambda b: b or "auto")
def test_default_is_unscaled_and_unchanged(backend):
    """token_scaling=False is the default: bit-identical loss and gradients."""
    results = []
    for scaling in ({}, {"token_scaling": False}):
        torch.manual_seed(3)
        hidden, weight, targets, kw = _inputs(torch.bfloat16, EVERYTHING)
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend, **kw, **scaling)
        loss.backward()
        results.append([loss, hidden.grad, weight.grad, kw["bias"].grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_masked_ce_passes_it_through():
    hidden, weight, targets, kw = _inputs(torch.float32, {"mask": True, "ignore_frac": 0.2})
    mask = kw.pop("loss_mask")
    for key in ("normalizer", "z_loss"):
        kw.pop(key)
    got = t3s.masked_ce(hidden, weight, targets, mask, token_scaling=True, backend="torch", **kw)
    want = linear_cross_entropy(hidden, weight, targets, loss_mask=mask, token_scaling=True,
                                backend="torch", **kw)
    torch.testing.assert_close(got, want)
    plain = t3s.masked_ce(hidden, weight, targets, mask, backend="torch", **kw)
    assert got < plain  # every p < 1 shrinks the mean


@pytest.mark.parametrize("bad", ["yes", 1, None, torch.tensor(True)], ids=repr)
def test_non_bool_token_scaling_is_a_type_error(bad):
    hidden, weight, targets, _ = _inputs(torch.float32, {})
    with pytest.raises(TypeError, match="token_scaling must be a bool"):
        linear_cross_entropy(hidden, weight, targets, token_scaling=bad)
    with pytest.raises(TypeError, match="token_scaling must be a bool"):
        t3s.masked_ce(hidden, weight, targets, token_scaling=bad)


def test_vocab_parallel_does_not_ignore_it():
    """The vocab-parallel loss has no token scaling: asking for it fails, never silently."""
    hidden, weight, targets, _ = _inputs(torch.float32, {})
    with pytest.raises(TypeError, match="token_scaling"):
        t3s_kernels.vocab_parallel_cross_entropy(hidden, weight, targets, token_scaling=True)
