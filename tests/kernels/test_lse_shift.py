"""return_lse (a differentiable log-sum-exp output) and shift=1 (the causal-LM label shift
inside the op).

The lse is checked against ``torch.logsumexp`` of float64 materialised logits
z = softcap(logit_scale * r) / temperature, and its gradient through a loss that uses it
(a z-loss recipe: loss + c * mean(lse**2)) against autograd on those logits, on every CPU
path (the reference, the C++ and the interpreted Triton kernels, one-pass and deferred,
and the dense path), every reduction, fp32 and bf16. shift=1 is checked against shifting
by hand (HF's hidden[..., :-1, :] against labels[..., 1:]).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE
from kernel_helpers import assert_close64, make_case

from t3s_kernels import debug, lse_output, linear_cross_entropy, target_logprobs
from t3s_kernels.vocab_parallel import vocab_parallel_cross_entropy

N, H, V = 23, 11, 53  # odd sizes
OPTS = dict(softcap=4.0, logit_scale=1.3, temperature=0.8, z_loss=1e-3, label_smoothing=0.1)
ZC = 0.5  # the coefficient of the lse term: large enough that its gradient matters

PATHS = ([("torch", "one_pass")]
         + ([("cpp", "one_pass"), ("cpp", "deferred")] if "cpp" in BACKENDS else [])
         + ([("triton", "one_pass"), ("triton", "deferred")] if "triton" in BACKENDS else [])
         + [(None, "dense")])
IDS = [f"{b or 'auto'}-{m}" for b, m in PATHS]


def _reference(hidden, weight, bias, targets, mask, reduction, grad_out):
    """float64 (loss-with-lse-term, lse [N] with 0 on dropped rows, leaves h, w, b)."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = OPTS["softcap"] * torch.tanh(OPTS["logit_scale"] * F.linear(h, w, b) / OPTS["softcap"])
    z = z / OPTS["temperature"]
    kept = (targets != -100) & (mask != 0)
    lse = torch.logsumexp(z, 1) * kept
    per = F.cross_entropy(z, targets, reduction="none", label_smoothing=OPTS["label_smoothing"])
    per = (per + OPTS["z_loss"] * lse ** 2) * mask * kept
    loss = {"none": (per * grad_out).sum(), "sum": per.sum(), "mean": per.sum() / (mask * kept).sum()}
    return loss[reduction] + ZC * (lse ** 2).mean(), lse, (h, w, b)


@pytest.mark.parametrize("backend,mode", PATHS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_return_lse_and_its_gradient_match_float64(backend, mode, reduction, monkeypatch):
    if mode == "deferred":
        monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)
    if backend == "cpp":
        monkeypatch.setitem(debug.OVERRIDES, "cpu_block", (8, 32))
    dtype = torch.bfloat16 if reduction == "mean" else torch.float32
    hidden, weight, targets, bias = make_case(N, H, V, dtype, DEVICE, bias=True, ignore_frac=0.2)
    mask = torch.rand(N, device=DEVICE) + 0.5
    mask[torch.rand(N, device=DEVICE) < 0.2] = 0.0
    grad_out = torch.randn(N, dtype=torch.float64)
    loss, lse = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                     reduction=reduction, backend=backend, return_lse=True,
                                     **OPTS)
    assert lse.shape == (N,) and lse.dtype == torch.float32 and lse.requires_grad
    scalar = (loss * grad_out.float()).sum() if reduction == "none" else loss
    (scalar + ZC * lse.pow(2).mean()).backward()
    ref, lse64, (h64, w64, b64) = _reference(hidden, weight, bias, targets, mask, reduction,
                                             grad_out)
    ref.backward()
    loss_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_close64(lse, lse64, loss_dtype, "lse")
    assert (lse[lse64 == 0] == 0).all()  # dropped rows: 0, not NaN
    assert_close64(hidden.grad, h64.grad, dtype, "grad_hidden")
    assert_close64(weight.grad, w64.grad, dtype, "grad_weight")
    assert_close64(bias.grad, b64.grad, dtype, "grad_bias")


def test_unused_lse_costs_no_backward_pass(monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the lse backward pass ran for an unused lse")
    monkeypatch.setattr(lse_output, "lse_input_grads", no_pass)
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    loss, lse = linear_cross_entropy(hidden, weight, targets, backend="torch", return_lse=True)
    loss.backward()
    plain = linear_cross_entropy(hidden, weight, targets, backend="torch")
    assert torch.equal(loss, plain)


def test_return_order_with_stats():
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, ignore_frac=0.3)
    loss, lse, stats = linear_cross_entropy(hidden, weight, targets, backend="torch",
                                            return_lse=True, return_stats=True)
    kept = targets != -100
    torch.testing.assert_close(lse[kept], stats.lse[kept])
    assert loss.dim() == 0 and (lse[~kept] == 0).all()


def test_second_order_through_lse():
    """create_graph=True: the lse pass is differentiated exactly, for each reduction."""
    hidden, weight, targets, bias = make_case(5, 3, 7, torch.float64, DEVICE, bias=True,
                                              ignore_frac=0.2)
    opts = dict(softcap=2.0, logit_scale=1.3, temperature=0.7)
    for reduction in ("mean", "none"):
        def f(h, w, b):
            loss, lse = linear_cross_entropy(h, w, targets, bias=b, backend="torch",
                                             reduction=reduction, return_lse=True, **opts)
            return loss.sum() + 0.3 * lse.pow(2).sum()
        torch.autograd.gradcheck(f, (hidden, weight, bias))
        torch.autograd.gradgradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "auto"])
@pytest.mark.parametrize("lead", [(3, 7), (13,)], ids=["BT", "N"])
def test_shift_matches_shifting_by_hand(backend, lead):
    hidden, weight, targets, bias = make_case(None, H, V, torch.float32, DEVICE, lead=lead,
                                              bias=True, ignore_frac=0.2)
    mask = (torch.rand(lead, device=DEVICE) > 0.2).float() * 1.5
    got = {}
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                    reduction=reduction, shift=1, backend=backend, **OPTS)
        assert loss.shape == (() if reduction == "mean" else lead)
        g = torch.autograd.grad(loss.sum(), (hidden, weight))
        h2 = hidden.detach()[..., :-1, :].requires_grad_()
        want = linear_cross_entropy(h2, weight, targets[..., 1:], bias=bias,
                                    loss_mask=mask[..., 1:], reduction=reduction,
                                    backend=backend, **OPTS)
        gw = torch.autograd.grad(want.sum(), (h2, weight))
        if reduction == "none":
            torch.testing.assert_close(loss[..., :-1], want)
            assert (loss[..., -1] == 0).all()
        else:
            torch.testing.assert_close(loss, want)
        torch.testing.assert_close(g[0][..., :-1, :], gw[0])
        assert (g[0][..., -1, :] == 0).all()
        torch.testing.assert_close(g[1], gw[1])
        got[reduction] = loss
    assert torch.isfinite(got["mean"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_logprobs_shift_matches_shifting_by_hand(backend):
    """Log-probs of the next token: each sequence's last position is skipped (NaN)."""
    lead = (3, 7)
    hidden, weight, targets, bias = make_case(None, H, V, torch.float32, DEVICE, lead=lead,
                                              bias=True, ignore_frac=0.2)
    got = target_logprobs(hidden, weight, targets, bias=bias, shift=1, backend=backend,
                          return_entropy=True, temperature=0.8)
    want = target_logprobs(hidden[..., :-1, :], weight, targets[..., 1:], bias=bias,
                           backend=backend, return_entropy=True, temperature=0.8)
    assert got.logprobs.shape == lead and torch.isnan(got.logprobs[..., -1]).all()
    torch.testing.assert_close(got.logprobs[..., :-1], want.logprobs, equal_nan=True)
    with pytest.raises(ValueError, match="shift must be 0 or 1"):
        target_logprobs(hidden, weight, targets, shift=2, backend=backend)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shift=2), ValueError, "shift must be 0 or 1"),
    (dict(shift=True), ValueError, "shift must be 0 or 1"),
    (dict(shift=-1), ValueError, "shift must be 0 or 1"),
    (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
])
def test_bad_shift_and_return_lse(kwargs, error, match):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, targets, backend="torch", **kwargs)


def test_shift_on_a_single_token_raises():
    weight = torch.randn(V, H)
    with pytest.raises(ValueError, match="shift=1 needs hidden"):
        linear_cross_entropy(torch.randn(H), weight, torch.tensor(3), shift=1, backend="torch")


@pytest.mark.parametrize("kwargs,match", [
    (dict(logit_scale=2.0), "logit_scale; use hidden"),
    (dict(temperature=0.7, softcap=3.0), "temperature; use t3s_kernels.linear_cross_entropy"),
    (dict(class_weight=torch.ones(V)), "class_weight; use t3s_kernels.linear_cross_entropy"),
])
def test_vocab_parallel_refuses_the_unsharded_options(kwargs, match):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    with pytest.raises(NotImplementedError, match=match):
        vocab_parallel_cross_entropy(hidden, weight, targets, **kwargs)
