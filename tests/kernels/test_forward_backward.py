"""The gradient computed in the loss forward ('mean' / 'sum'): the Triton one-pass kernels
(`t3s_kernels.triton.forward_backward`) and the backend seam `loss_forward_backward`.

Against the float64 reference: loss and every gradient, fp32 / bf16, with the options,
masks, weights, normalizers; and against the deferred backward. On CPU the kernels run
in the interpreter. filter_eps=0.0 sends every tile through the filtered (tile-list)
kernels; filter_eps=None through the library GEMMs.
"""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from kernel_helpers import TOL, assert_close64, gemm_term_scales, make_case, naive_lce64

from t3s_kernels import debug, linear_cross_entropy
from t3s_kernels.backends import get_backend

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")

N, H, V = 37, 48, 1000

if "triton" in BACKENDS:
    from t3s_kernels.triton import forward_backward as fb


@pytest.fixture
def one_pass_calls(monkeypatch):
    """Counts the one-pass Triton launches, so a test can assert that it really ran."""
    calls = []
    real = fb.loss_forward_backward
    monkeypatch.setattr(fb, "loss_forward_backward",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    return calls


def _inputs(dtype, *, bias=True, mask=None, ignore_frac=0.2, n=N, v=V, peaked=False):
    hidden, weight, targets, b = make_case(n, H, v, dtype, DEVICE, bias=bias,
                                           ignore_frac=ignore_frac, peaked=peaked)
    loss_mask = None
    if mask == "bool":
        loss_mask = torch.rand(n, device=DEVICE) < 0.6
    elif mask == "float":
        loss_mask = torch.rand(n, device=DEVICE) * 2.0
        loss_mask[torch.rand(n, device=DEVICE) < 0.3] = 0.0
    return hidden, weight, targets, b, loss_mask


def _grads(hidden, weight, bias, targets, grad_out=1.0, **kw):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend="triton", **kw)
    (loss * grad_out).backward()
    return loss.detach(), tuple(None if t is None else t.grad.clone()
                                for t in (hidden, weight, bias))


CASES = {
    "plain": dict(mask=None),
    "bool_mask_sum": dict(mask="bool", reduction="sum"),
    "float_mask": dict(mask="float"),
    "normalizer": dict(mask="bool", normalizer=23.0),
    "options": dict(mask="float", label_smoothing=0.05, softcap=5.0, z_loss=1e-3),
}


@pytest.mark.parametrize("filter_eps", [None, 0.0], ids=["exact_gemms", "tile_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_matches_float64(case, dtype, filter_eps, one_pass_calls):
    kw = dict(CASES[case])
    mask = kw.pop("mask")
    hidden, weight, targets, bias, loss_mask = _inputs(dtype, mask=mask)
    loss, (gh, gw, gb) = _grads(hidden, weight, bias, targets, loss_mask=loss_mask,
                                filter_eps=filter_eps, **kw)
    assert len(one_pass_calls) == 1
    ref, (h64, w64, b64), logits64 = naive_lce64(hidden, weight, targets, bias=bias,
                                                 loss_mask=loss_mask, keep_logits=True, **kw)
    ref.backward()
    assert_close64(loss, ref, torch.float32, "loss")
    scale_h, scale_w = gemm_term_scales(h64, w64, logits64)
    assert_close64(gh, h64.grad, dtype, "grad_hidden", term_scale=scale_h)
    assert_close64(gw, w64.grad, dtype, "grad_weight", term_scale=scale_w)
    assert_close64(gb, b64.grad, dtype, "grad_bias")


@pytest.mark.parametrize("buffer_bytes,fp32_acc", [(2**16, False), (2**22 + 2**16, True)],
                         ids=["weight_dtype_accumulation", "fp32_accumulator"])
@pytest.mark.parametrize("filter_eps", [None, 0.0], ids=["exact_gemms", "tile_kernels"])
def test_row_chunks_accumulate_grad_weight(buffer_bytes, fp32_acc, filter_eps, one_pass_calls):
    """Several row chunks: grad_weight sums over them (in a float32 accumulator, or in
    the weight's dtype when accum_dtype asks for it), grad_hidden is written per chunk."""
    dtype = torch.bfloat16
    accum = torch.float32 if fp32_acc else torch.bfloat16
    hidden, weight, targets, bias, loss_mask = _inputs(dtype, mask="float", n=70, v=300)
    loss, (gh, gw, gb) = _grads(hidden, weight, bias, targets, loss_mask=loss_mask,
                                filter_eps=filter_eps, buffer_bytes=buffer_bytes,
                                accum_dtype=accum)
    plan = one_pass_calls[0]
    assert plan.fp32_weight_accumulator == fp32_acc
    assert plan.chunk_rows < (targets != -100).sum(), "expected several row chunks"
    ref, (h64, w64, b64), logits64 = naive_lce64(hidden, weight, targets, bias=bias,
                                                 loss_mask=loss_mask, keep_logits=True)
    ref.backward()
    assert_close64(loss, ref, torch.float32, "loss")
    scale_h, scale_w = gemm_term_scales(h64, w64, logits64)
    assert_close64(gh, h64.grad, dtype, "grad_hidden", term_scale=scale_h)
    # accumulation in bf16 rounds once per chunk: allow one more bf16 step per chunk
    chunks = -(-int((loss_mask * (targets != -100)).ne(0).sum()) // plan.chunk_rows)
    assert_close64(gw, w64.grad, dtype, "grad_weight",
                   term_scale=scale_w * (1 if fp32_acc else chunks + 1))
    assert_close64(gb, b64.grad, dtype, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("filter_eps", [None, "auto"], ids=["exact", "auto"])
def test_one_pass_equals_deferred(dtype, filter_eps, monkeypatch):
    hidden, weight, targets, bias, loss_mask = _inputs(dtype, mask="float", peaked=True)
    kw = dict(loss_mask=loss_mask, filter_eps=filter_eps, label_smoothing=0.1, grad_out=2.5)
    one = _grads(hidden, weight, bias, targets, **kw)
    monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)
    deferred = _grads(hidden, weight, bias, targets, **kw)
    torch.testing.assert_close(one[0], deferred[0], rtol=1e-6, atol=1e-6)
    rel = TOL[dtype][0]
    for name, a, b in zip(("grad_hidden", "grad_weight", "grad_bias"), one[1], deferred[1]):
        err = (a.double() - b.double()).norm() / b.double().norm()
        assert err <= rel, f"{name}: one-pass vs deferred differ by {err:.2e}"


def test_grad_output_scales_the_saved_gradients(one_pass_calls):
    """The backward only multiplies by grad_output: 3 * loss gives 3 * the gradients."""
    hidden, weight, targets, bias, _ = _inputs(torch.float32)
    _, g1 = _grads(hidden, weight, bias, targets)
    _, g3 = _grads(hidden, weight, bias, targets, grad_out=3.0)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, 3.0 * a, rtol=1e-6, atol=1e-7)
    assert len(one_pass_calls) == 2


def test_a_retained_graph_backpropagates_twice():
    """A second backward through a retained graph gets the same gradient again (the saved
    gradients are scaled out of place), as per-group gradient analyses need."""
    hidden, weight, targets, _, _ = _inputs(torch.float32, bias=False)
    loss = linear_cross_entropy(hidden, weight, targets, backend="triton")
    g1 = torch.autograd.grad(loss * 3.0, [hidden, weight], retain_graph=True)
    g2 = torch.autograd.grad(loss, [hidden, weight])
    for a, b in zip(g1, g2):
        assert torch.isfinite(b).all() and (b.abs() > 0).any()
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_tokens_dropped(reduction, one_pass_calls):
    hidden, weight, targets, bias, _ = _inputs(torch.bfloat16)
    mask = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    loss, grads = _grads(hidden, weight, bias, targets, loss_mask=mask, reduction=reduction,
                         filter_eps=0.0)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    assert len(one_pass_calls) == 1


def test_filtered_tiles_get_no_gradient(one_pass_calls):
    """With a large threshold only the target tile's columns get a gradient, and the kept
    tiles carry the exact gradient (tile kernels skip the rest)."""
    debug.OVERRIDES.update(block=(16, 64, 16))
    hidden, weight, _, _, _ = _inputs(torch.float32, bias=False)
    weight = (weight.detach() * 0.25).requires_grad_()
    targets = torch.randint(0, 64, (N,), device=DEVICE)
    _, (gh, gw, _) = _grads(hidden, weight, None, targets, filter_eps=0.5)
    _, (gh_exact, gw_exact, _) = _grads(hidden, weight, None, targets, filter_eps=None)
    assert (gw[64:] == 0).all() and (gw_exact[64:] != 0).any()
    torch.testing.assert_close(gw[:64], gw_exact[:64], atol=0.05, rtol=0.5)
    assert len(one_pass_calls) == 2


def test_stats_and_lse_from_the_one_pass(one_pass_calls):
    hidden, weight, targets, bias, loss_mask = _inputs(torch.bfloat16, mask="bool")
    loss, stats = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=loss_mask,
                                       return_stats=True, softcap=4.0, backend="triton")
    with torch.no_grad():
        ref_loss, ref_stats = linear_cross_entropy(hidden, weight, targets, bias=bias,
                                                   loss_mask=loss_mask, return_stats=True,
                                                   softcap=4.0, backend="triton")
    assert len(one_pass_calls) == 1  # the no-grad call takes the plain forward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, ref in zip(stats, ref_stats):
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_partial_gradients_and_no_grad(one_pass_calls):
    hidden, weight, targets, bias, _ = _inputs(torch.float32)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    linear_cross_entropy(hidden, weight, targets, bias=bias, backend="triton",
                         filter_eps=0.0).backward()
    assert weight.grad is None and bias.grad is None and hidden.grad is not None
    ref, (h64, _, _) = naive_lce64(hidden, weight, targets, bias=bias)
    ref.backward()
    assert_close64(hidden.grad, h64.grad, torch.float32, "grad_hidden")
    assert one_pass_calls[0].fp32_weight_accumulator is False


def test_plan_falls_back_when_the_accumulator_does_not_fit(one_pass_calls):
    """A float32 [V, H] accumulator larger than buffer_bytes: the forward and the deferred
    backward run instead (still exact to the reference)."""
    assert fb.plan_forward_backward(37, 1000, 48, 2, True, True, 2**16) is None
    assert fb.plan_forward_backward(37, 1000, 48, 2, True, False, 2**16) is not None
    hidden, weight, targets, bias, _ = _inputs(torch.bfloat16)
    loss, (gh, gw, gb) = _grads(hidden, weight, bias, targets, buffer_bytes=2**16)
    assert one_pass_calls == []
    ref, (h64, w64, b64), logits64 = naive_lce64(hidden, weight, targets, bias=bias,
                                                 keep_logits=True)
    ref.backward()
    scale_h, scale_w = gemm_term_scales(h64, w64, logits64)
    assert_close64(gw, w64.grad, torch.bfloat16, "grad_weight", term_scale=scale_w)


def test_base_backend_default_runs_forward_then_backward():
    """Every backend has loss_forward_backward: the torch backend's default gives the
    reference forward and the gradients of sum grad_scale * loss."""
    from t3s_kernels.prepare import LossOptions
    hidden, weight, targets, bias, _ = _inputs(torch.float64, ignore_frac=0.0)
    rows = torch.arange(5, 30, device=DEVICE)
    scale = torch.rand(rows.numel(), dtype=torch.float64, device=DEVICE)
    out, (gh, gw, gb) = get_backend("torch").loss_forward_backward(
        hidden.detach(), weight.detach(), bias.detach(), rows, targets[rows], scale,
        LossOptions(), False, (True, True, True))
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    lse = torch.logsumexp(h[rows] @ w.T + b, 1)
    per = lse - (h[rows] @ w.T + b).gather(1, targets[rows, None]).squeeze(1)
    (per * scale).sum().backward()
    torch.testing.assert_close(out.loss, per.detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)
    assert (gh[:5] == 0).all() and (gh[30:] == 0).all()


def test_tensor_descriptor_and_pointer_loads_agree(monkeypatch):
    """The W (and G) tiles come through tensor descriptors where TMA applies; the plain
    pointer loads (strides that are not 16-byte aligned, older GPUs) give the same."""
    from t3s_kernels import target_logprobs
    from t3s_kernels.triton import config
    hidden, weight, targets, bias, loss_mask = _inputs(torch.bfloat16, mask="float")
    assert config.tma_problem(weight) is None
    assert config.tma_problem(torch.empty(5, 17, dtype=torch.bfloat16)) is not None
    kw = dict(loss_mask=loss_mask, filter_eps=0.0, softcap=6.0)
    with_tma = _grads(hidden, weight, bias, targets, **kw)
    lp_tma = target_logprobs(hidden, weight, targets, bias=bias)
    monkeypatch.setitem(debug.OVERRIDES, "tma", False)
    assert config.tma_problem(weight) is not None
    plain = _grads(hidden, weight, bias, targets, **kw)
    lp_plain = target_logprobs(hidden, weight, targets, bias=bias)
    torch.testing.assert_close(with_tma[0], plain[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(with_tma[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(lp_tma, lp_plain, rtol=1e-6, atol=1e-6, equal_nan=True)
