"""Every bad input gets a clear ValueError/TypeError naming the argument, raised before
any kernel launch, leaving the caller's tensors untouched."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from kernel_helpers import make_case

from t3s_kernels import linear_cross_entropy, target_logprobs
from t3s_kernels.backends import get_backend, registered_backends

N, H, V = 13, 16, 50


@pytest.fixture(autouse=True)
def _no_kernel_may_run(monkeypatch):
    """Any kernel launch in these tests is a failure: errors must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")
    for name in registered_backends():
        for method in ("loss_forward", "loss_backward", "target_logprobs"):
            monkeypatch.setattr(get_backend(name), method, boom)


def _inputs(dtype=torch.float32):
    h, w, y, b = make_case(N, H, V, dtype, DEVICE, bias=True)
    return h, w, y, b


def _check(fn, exc, match, *tensors):
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(exc, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b) or (t.isnan() == b.isnan()).all(), "input was modified"
        if t.requires_grad:
            assert t.grad is None


BAD_CASES = {
    # name: (kwargs override builder, exception, message pattern)
    "label_too_large": (lambda h, w, y, b: {"targets": torch.where(torch.arange(N, device=DEVICE) == 3, V, y)},
                        ValueError, r"targets .*outside \[0, V=50\)"),
    "label_negative": (lambda h, w, y, b: {"targets": torch.where(torch.arange(N, device=DEVICE) == 3, -5, y)},
                       ValueError, "targets .*first: -5"),
    "label_float": (lambda h, w, y, b: {"targets": y.float()}, TypeError, "targets must be an integer"),
    "targets_shape": (lambda h, w, y, b: {"targets": y[:-1]}, ValueError, "targets has shape"),
    "hidden_width": (lambda h, w, y, b: {"hidden": h[:, :-1]}, ValueError, "hidden has H=15"),
    "weight_1d": (lambda h, w, y, b: {"weight": w[0]}, ValueError, r"weight must have shape \[V, H\]"),
    "weight_dtype": (lambda h, w, y, b: {"weight": w.double()}, TypeError, "weight has dtype"),
    "hidden_int": (lambda h, w, y, b: {"hidden": y[:, None].expand(N, H)}, TypeError, "hidden must be a floating"),
    "hidden_not_tensor": (lambda h, w, y, b: {"hidden": [[1.0] * H] * N}, TypeError, "hidden must be a torch.Tensor"),
    "weight_device": (lambda h, w, y, b: {"weight": torch.empty(V, H, device="meta")}, ValueError, "weight is on meta"),
    "targets_device": (lambda h, w, y, b: {"targets": torch.empty(N, dtype=torch.long, device="meta")},
                       ValueError, "targets is on meta"),
    "empty_batch": (lambda h, w, y, b: {"hidden": h[:0], "targets": y[:0]}, ValueError, "empty batch"),
    "bias_shape": (lambda h, w, y, b: {"bias": b[:-1]}, ValueError, r"bias must have shape \[V\]"),
    "bias_dtype": (lambda h, w, y, b: {"bias": b.half()}, TypeError, "bias has dtype"),
}

LOSS_ONLY_CASES = {
    "mask_int": (lambda h, w, y, b: {"loss_mask": torch.ones(N, dtype=torch.int64, device=DEVICE)},
                 TypeError, "loss_mask must be bool or floating"),
    "mask_shape": (lambda h, w, y, b: {"loss_mask": torch.ones(N + 1, device=DEVICE)}, ValueError,
                   "loss_mask has shape"),
    "mask_negative": (lambda h, w, y, b: {"loss_mask": -torch.ones(N, device=DEVICE)}, ValueError,
                      "loss_mask has 13 negative"),
    "mask_nan": (lambda h, w, y, b: {"loss_mask": torch.full((N,), float("nan"), device=DEVICE)},
                 ValueError, "non-finite"),
    "reduction": (lambda h, w, y, b: {"reduction": "avg"}, ValueError, "reduction must be one of"),
    "label_smoothing": (lambda h, w, y, b: {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    "softcap": (lambda h, w, y, b: {"softcap": -1.0}, ValueError, "softcap"),
    "z_loss": (lambda h, w, y, b: {"z_loss": float("nan")}, ValueError, "z_loss"),
    "normalizer_none": (lambda h, w, y, b: {"normalizer": 4, "reduction": "none"}, ValueError, "normalizer"),
    "normalizer_zero": (lambda h, w, y, b: {"normalizer": 0}, ValueError, "normalizer must be > 0"),
    "normalizer_vector": (lambda h, w, y, b: {"normalizer": torch.ones(2)}, ValueError, "normalizer must be a scalar"),
    "filter_eps": (lambda h, w, y, b: {"filter_eps": "fast"}, ValueError, "filter_eps"),
    "accum_dtype": (lambda h, w, y, b: {"accum_dtype": torch.int32}, ValueError, "accum_dtype"),
    "buffer_bytes": (lambda h, w, y, b: {"buffer_bytes": 10}, ValueError, "buffer_bytes"),
    "backend": (lambda h, w, y, b: {"backend": "cuda"}, ValueError, "backend must be one of"),
}


def _call_loss(h, w, y, b, **override):
    args = {"hidden": h, "weight": w, "targets": y, "bias": b, **override}
    return lambda: linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CASES) + list(LOSS_ONLY_CASES))
def test_loss_rejects(backend, case):
    build, exc, match = {**BAD_CASES, **LOSS_ONLY_CASES}[case]
    h, w, y, b = _inputs()
    override = build(h, w, y, b)
    if "backend" not in override:
        override["backend"] = backend
    _check(_call_loss(h, w, y, b, **override), exc, match, h, w, y, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_logprobs_rejects(backend, case):
    build, exc, match = BAD_CASES[case]
    h, w, y, b = _inputs()
    args = {"hidden": h, "weight": w, "targets": y, "bias": b, **build(h, w, y, b), "backend": backend}
    _check(lambda: target_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args),
           exc, match, h, w, y, b)


def test_triton_rejects_float64():
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    h, w, y, b = _inputs(torch.float64)
    _check(lambda: linear_cross_entropy(h, w, y, backend="triton"), TypeError, "float64", h, w)


def test_ignored_label_out_of_range_is_fine(monkeypatch):
    """ignore_index itself may be out of [0, V): it is never used as an index."""
    monkeypatch.undo()  # kernels allowed here
    h, w, y, _ = _inputs()
    y[0] = -100
    loss = linear_cross_entropy(h, w, y, backend="torch")
    assert torch.isfinite(loss)
