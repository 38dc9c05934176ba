"""linear_cross_entropy against a float64 reference: loss and every gradient.

Runs on both backends; on CPU the Triton backend runs the real kernels
through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_helpers import TOL, assert_close64, gemm_term_scales, make_case, naive_lce64

import t3s_kernels
from t3s_kernels import debug, linear_cross_entropy, target_logprobs

N, H, V = 37, 48, 1000  # odd sizes: no dimension is a multiple of a block

OPTION_CASES = {
    "plain": {},
    "ignore": {"ignore_frac": 0.3},
    "custom_ignore_index": {"ignore_frac": 0.3, "ignore_index": 7},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "bias": {"bias": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "normalizer": {"normalizer": 23.0, "mask": "bool"},
    "normalizer_tensor_sum": {"normalizer": "tensor", "reduction": "sum"},
    "everything": {"ignore_frac": 0.2, "mask": "float", "bias": True, "label_smoothing": 0.05,
                   "softcap": 5.0, "z_loss": 1e-3},
}


def _run_case(backend, dtype, opts, *, n=N, h=H, v=V, lead=None, peaked=False, **kernel_kw):
    ignore_index = opts.get("ignore_index", -100)
    hidden, weight, targets, bias = make_case(
        n, h, v, dtype, DEVICE, lead=lead, peaked=peaked, bias=opts.get("bias", False),
        ignore_frac=opts.get("ignore_frac", 0.0), ignore_index=ignore_index)
    loss_mask = None
    if opts.get("mask") == "bool":
        loss_mask = torch.rand(targets.shape, device=DEVICE) < 0.6
    elif opts.get("mask") == "float":
        loss_mask = torch.rand(targets.shape, device=DEVICE) * 2.0
        loss_mask[torch.rand(targets.shape, device=DEVICE) < 0.3] = 0.0
    normalizer = opts.get("normalizer")
    if normalizer == "tensor":
        normalizer = torch.tensor(17.0, device=DEVICE)
    kw = dict(bias=bias, loss_mask=loss_mask, ignore_index=ignore_index,
              reduction=opts.get("reduction", "mean"), normalizer=normalizer,
              label_smoothing=opts.get("label_smoothing", 0.0), softcap=opts.get("softcap"),
              z_loss=opts.get("z_loss", 0.0))
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend, **kw, **kernel_kw)
    ref, (h64, w64, b64), logits64 = naive_lce64(
        hidden, weight, targets, keep_logits=True,
        **{**kw, "normalizer": None if normalizer is None else float(normalizer)})
    # A random per-token grad_output for 'none' checks that it is honoured token by token.
    grad_out = torch.randn_like(ref) if kw["reduction"] == "none" else torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype).to(loss.device))
    ref.backward(grad_out)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close64(loss, ref, torch.float32 if dtype != torch.float64 else dtype, "loss")
    scale_h, scale_w = gemm_term_scales(h64, w64, logits64)
    assert_close64(hidden.grad, h64.grad, dtype, "grad_hidden", term_scale=scale_h)
    assert_close64(weight.grad, w64.grad, dtype, "grad_weight", term_scale=scale_w)
    if bias is not None:
        assert_close64(bias.grad, b64.grad, dtype, "grad_bias")
    return hidden, weight, targets


# The Triton backend runs three times: with the gradient computed in the forward
# ('mean' / 'sum'; 'none' always defers), and deferred to the backward in its exact
# dense mode (G chunks + GEMMs) and its fused in-kernel mode (atomics) with filtering off.
# The C++ CPU backend runs twice: its one-pass forward + gradient, and deferred.
PATHS = ([("torch", None)]
         + ([("triton", "forward_backward"), ("triton", "dense"), ("triton", "fused")]
            if "triton" in BACKENDS else [])
         + ([("cpp", "forward_backward"), ("cpp", "deferred")] if "cpp" in BACKENDS else []))


def defer_backward(monkeypatch):
    """Make 'mean' / 'sum' take the deferred backward (the default computes the gradient
    in the forward)."""
    monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)


@pytest.mark.parametrize("backend,mode", PATHS, ids=[f"{b}-{m}" if m else b for b, m in PATHS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_float64(backend, mode, dtype, case, monkeypatch):
    if mode in ("dense", "fused"):
        debug.OVERRIDES["backward"] = mode
    if mode in ("dense", "fused", "deferred"):
        defer_backward(monkeypatch)
    _run_case(backend, dtype, OPTION_CASES[case], filter_eps=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs(backend):
    _run_case(backend, torch.float16, {"bias": True, "mask": "float"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 48, 1000), (37, 17, 129), (5, 64, 77), (2, 16, 1)],
                         ids=["N1", "H17_V129", "V77", "V1"])
def test_odd_shapes(backend, shape):
    n, h, v = shape
    _run_case(backend, torch.float32, {"ignore_frac": 0.2 if n > 1 else 0.0}, n=n, h=h, v=v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    hidden, _, _ = _run_case(backend, torch.float32, {"mask": "bool"}, lead=(3, 11))
    assert hidden.grad.shape == (3, 11, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden(backend):
    base = torch.randn(H, N, device=DEVICE)
    hidden = base.t().requires_grad_()  # [N, H] with strides (1, N)
    assert not hidden.is_contiguous()
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss.backward()
    ref, (h64, w64, _) = naive_lce64(hidden, weight, targets)
    ref.backward()
    assert_close64(loss, ref, torch.float32, "loss")
    assert_close64(hidden.grad, h64.grad, torch.float32, "grad_hidden")
    assert_close64(weight.grad, w64.grad, torch.float32, "grad_weight")


def test_triton_vocab_splits_and_small_blocks():
    """Several vocab splits exercise the host-side merge of partial lse/argmax."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    debug.OVERRIDES.update(splits=3, block=(16, 32, 16))
    hidden, weight, targets = _run_case("triton", torch.float32, OPTION_CASES["everything"])
    _, stats = linear_cross_entropy(hidden, weight, targets, backend="triton", return_stats=True)
    z = hidden.detach().double() @ weight.detach().double().T
    assert torch.equal(stats.argmax_correct, z.argmax(1) == targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_buffer_chunks(backend):
    """A tiny buffer forces vocabulary chunks (Triton) and row chunks (reference)."""
    _run_case(backend, torch.bfloat16, OPTION_CASES["everything"], buffer_bytes=2**16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accum_dtype_weight_dtype(backend):
    # fp16 here: the Triton interpreter has no bf16 atomics (bf16 is covered by the reference).
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    _run_case(backend, dtype, {"mask": "bool"}, accum_dtype=dtype)


def test_accum_bf16_refused_by_interpreter():
    """The deferred backward adds into a bf16 grad_weight with atomics, which the
    interpreter lacks; 'none' always defers."""
    if "triton" not in BACKENDS or DEVICE.type == "cuda":
        pytest.skip("interpreter-only limitation")
    h, w, y, _ = make_case(N, H, V, torch.bfloat16, DEVICE)
    with pytest.raises(ValueError, match="accum_dtype"):
        linear_cross_entropy(h, w, y, backend="triton", accum_dtype=torch.bfloat16,
                             reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_dropped(backend, reduction):
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, DEVICE, bias=True)
    mask = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                reduction=reduction, backend=backend)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    # Ignoring every label is the same case.
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100), backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_propagates(backend):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=False)
    hidden[5, 3] = float("nan")
    assert math.isnan(linear_cross_entropy(hidden, weight, targets, backend=backend).item())
    # A NaN in a dropped token is outside the loss, as with F.cross_entropy's ignore_index.
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[5] = False
    assert math.isfinite(linear_cross_entropy(hidden, weight, targets, loss_mask=mask,
                                              backend=backend).item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_hidden_gives_nan_like_torch(backend):
    """An infinite hidden state in a kept token: NaN loss and log-prob, as F.cross_entropy
    gives (not +inf, which torch.logsumexp alone would give); other tokens unaffected."""
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=False)
    hidden[5, 3] = float("inf")
    hidden[9, 0] = float("-inf")
    torch_loss = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    loss = linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    lp = target_logprobs(hidden, weight, targets, backend=backend)
    for row in (5, 9):
        assert torch_loss[row].isnan() and loss[row].isnan() and lp[row].isnan()
    finite = torch.ones(N, dtype=torch.bool, device=DEVICE)
    finite[[5, 9]] = False
    torch.testing.assert_close(loss[finite], torch_loss[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-lp[finite], torch_loss[finite], rtol=1e-5, atol=1e-5)
    assert linear_cross_entropy(hidden, weight, targets, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_partial_gradients(backend, which):
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, DEVICE, bias=True)
    (hidden if which == "weight" else weight).requires_grad_(False)
    bias.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend)
    loss.backward()
    ref, (h64, w64, _) = naive_lce64(hidden, weight, targets, bias=bias)
    ref.backward()
    if which == "hidden":
        assert weight.grad is None
        assert_close64(hidden.grad, h64.grad, torch.float32, "grad_hidden")
    else:
        assert hidden.grad is None
        assert_close64(weight.grad, w64.grad, torch.float32, "grad_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward(backend):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert loss.grad_fn is None
    ref, _ = naive_lce64(hidden, weight, targets)
    assert_close64(loss, ref, torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_return_stats(backend, softcap):
    hidden, weight, targets, bias = make_case(N, H, V, torch.bfloat16, DEVICE, bias=True,
                                              ignore_frac=0.2)
    mask = torch.rand(N, device=DEVICE) < 0.7
    loss, stats = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                       softcap=softcap, return_stats=True, backend=backend)
    z = hidden.detach().double() @ weight.detach().double().T + bias.detach().double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    kept = mask & (targets != -100)
    y = torch.where(kept, targets, 0)
    lse = torch.logsumexp(z, 1)
    logp = torch.log_softmax(z, 1)
    expected = {
        "target_logprob": logp.gather(1, y[:, None]).squeeze(1),
        "entropy": -(logp.exp() * logp).sum(1),
        "lse": lse,
    }
    for name, ref in expected.items():
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == targets.shape
        assert torch.isnan(got[~kept]).all(), f"{name}: dropped tokens must be NaN"
        assert_close64(got[kept], ref[kept], torch.float32, name)
    assert stats.argmax_correct.dtype == torch.bool
    assert torch.equal(stats.argmax_correct[kept], (z.argmax(1) == targets)[kept])
    assert not stats.argmax_correct[~kept].any()
    # The loss itself is unchanged by asking for statistics.
    plain = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                 softcap=softcap, backend=backend)
    torch.testing.assert_close(loss, plain)


def test_gradient_filtering_is_close_to_exact():
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    hidden, weight, targets, _ = make_case(N, H, V, torch.bfloat16, DEVICE, peaked=True)
    grads = {}
    for eps in (None, "auto"):
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, targets, filter_eps=eps, backend="triton").backward()
        grads[eps] = (hidden.grad.double(), weight.grad.double())
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        exact, filt = grads[None][i], grads["auto"][i]
        rel = (exact - filt).norm() / exact.norm()
        assert rel < TOL[torch.bfloat16][0], f"{name}: filtering moved the gradient by {rel:.2e}"


def test_gradient_filtering_skips_tiles():
    """With a large threshold, tiles without a target are skipped: their weight rows get
    exactly zero gradient, which the exact path never gives on random data."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    debug.OVERRIDES.update(block=(16, 64, 16))
    hidden, weight, _, _ = make_case(N, H, V, torch.float32, DEVICE)
    weight = (weight.detach() * 0.25).requires_grad_()  # flat softmax: every p_j << 0.5
    targets = torch.randint(0, 64, (N,), device=DEVICE)  # all targets in the first vocab tile
    linear_cross_entropy(hidden, weight, targets, filter_eps=0.5, backend="triton").backward()
    filtered = weight.grad.clone()
    weight.grad = None
    linear_cross_entropy(hidden, weight, targets, filter_eps=None, backend="triton").backward()
    assert (filtered[64:] == 0).all() and (weight.grad[64:] != 0).any()
    torch.testing.assert_close(filtered[:64], weight.grad[:64], atol=0.05, rtol=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_mask_equals_ignore_index(backend):
    """The drop-in contract: a bool mask gives the loss and gradients of setting the
    dropped labels to ignore_index."""
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    mask = torch.rand(N, device=DEVICE) < 0.5
    loss = linear_cross_entropy(hidden, weight, targets, loss_mask=mask, backend=backend)
    loss.backward()
    g = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref = torch.nn.functional.cross_entropy(
        hidden @ weight.T, torch.where(mask, targets, -100))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[0], hidden.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g[1], weight.grad, atol=1e-6, rtol=1e-4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), h=st.integers(1, 70), v=st.integers(1, 300),
       smooth=st.sampled_from([0.0, 0.2]), use_bias=st.booleans(), mask_frac=st.floats(0, 1))
def test_random_shapes_reference(n, h, v, smooth, use_bias, mask_frac):
    hidden, weight, targets, bias = make_case(n, h, v, torch.float32, DEVICE, bias=use_bias)
    mask = torch.rand(n, device=DEVICE) >= mask_frac
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                label_smoothing=smooth, backend="torch")
    loss.backward()
    ref, (h64, w64, b64) = naive_lce64(hidden, weight, targets, bias=bias, loss_mask=mask,
                                      label_smoothing=smooth)
    ref.backward()
    assert_close64(loss, ref, torch.float32, "loss")
    assert_close64(hidden.grad, h64.grad, torch.float32, "grad_hidden")
    assert_close64(weight.grad, w64.grad, torch.float32, "grad_weight")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 24), h=st.integers(1, 40), v=st.integers(1, 200),
       splits=st.integers(1, 3))
def test_random_shapes_triton(n, h, v, splits):
    debug.OVERRIDES.update(splits=splits, block=(16, 32, 16))
    try:
        _run_case("triton", torch.float32, {"ignore_frac": 0.25, "bias": True}, n=n, h=h, v=v)
    finally:
        debug.OVERRIDES.update(splits=None, block=None)


def test_float64_reference_backend():
    _run_case("torch", torch.float64, OPTION_CASES["everything"])


def test_backends_listed():
    assert "torch" in t3s_kernels.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_hidden_small_buffer(backend, monkeypatch):
    """Deferred backward, M * H * 4 > buffer_bytes: grad_hidden is done in row chunks in a
    separate pass."""
    defer_backward(monkeypatch)
    n, h = 40, 512
    assert n * h * 4 > 2**16
    from t3s_kernels.triton import backward as triton_linear_ce
    launches = []
    real = triton_linear_ce._launch_backward
    monkeypatch.setattr(triton_linear_ce, "_launch_backward",
                        lambda *a, **k: launches.append((k["dh"] is not None, k["dw"] is not None))
                        or real(*a, **k))
    _run_case(backend, torch.bfloat16, {"bias": True}, n=n, h=h, v=300, buffer_bytes=2**16)
    if backend == "triton":  # two row chunks for grad_hidden, then weight/bias chunks
        assert launches[:2] == [(True, False), (True, False)] and launches[2:]
        assert all(dw and not dh for dh, dw in launches[2:])


@pytest.mark.parametrize("h", [48, 512], ids=["dense_chunks", "dense_too_big_falls_back"])
def test_exact_backward_modes(h, monkeypatch):
    """Exact deferred backward: G in vocabulary chunks + GEMMs when its buffers fit, else
    the fused path."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    defer_backward(monkeypatch)
    from t3s_kernels.triton import backward as triton_linear_ce
    used = []
    for name in ("_dense_backward", "_fused_backward"):
        real = getattr(triton_linear_ce, name)
        monkeypatch.setattr(triton_linear_ce, name,
                            lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    _run_case("triton", torch.bfloat16, {"bias": True, "ignore_frac": 0.1}, n=40, h=h,
              filter_eps=None, buffer_bytes=2**16)
    assert used == (["_dense_backward"] if h == 48 else ["_fused_backward"])
