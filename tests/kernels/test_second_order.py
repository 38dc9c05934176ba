"""Second derivatives of linear_cross_entropy: exact on every backend and path.

A backward with ``create_graph=True`` must give gradients that autograd can differentiate
again (`t3s_kernels.second_order`); an ordinary backward keeps the kernels' gradients.

- float64 (the 'torch' reference and the automatic dense path): ``gradcheck`` and
  ``gradgradcheck`` on small odd shapes for every reduction, both loss ops (the one-pass
  op of 'mean' / 'sum', the deferred one), with and without bias, softcap, label
  smoothing, z-loss, masks and ignored tokens;
- every backend (the C++ and Triton kernels take no float64): Hessian-vector products
  on float32 inputs against float64 plain autograd (`kernel_helpers.naive_lce64`);
- the example of the report: the Hessian of loss + 0.5 ||h||^2 equals that of
  ``F.cross_entropy(F.linear(h, w), y)``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE
from kernel_helpers import assert_close64, naive_lce64

from t3s_kernels import debug, linear_cross_entropy

N, H, V = 5, 3, 7  # odd and tiny: gradgradcheck perturbs every input element

OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "label_smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 0.05},
    "masked": {"mask": True, "ignore": True},
    "everything": {"bias": True, "softcap": 3.0, "label_smoothing": 0.1, "z_loss": 0.02,
                   "mask": True, "ignore": True},
}
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture
def path(request, monkeypatch):
    """'one_pass': 'mean' / 'sum' take their gradient in the forward (the default);
    'deferred': the per-token op and its backward, as 'none' always does."""
    if request.param == "deferred":
        monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)
    return request.param


def _inputs(opts, dtype, n=N, h=H, v=V):
    """Fresh random hidden [n, h], weight [v, h], targets [n] (one ignored with "ignore"),
    bias [v] or None and a float mask [n] or None; no zeros among the float inputs."""
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64)
    bias = torch.randn(v, dtype=torch.float64) * 0.5 if opts.get("bias") else None
    targets = torch.randint(0, v, (n,))
    mask = None
    if opts.get("ignore"):
        targets[1] = -100
    if opts.get("mask"):
        mask = torch.rand(n, dtype=torch.float64) * 1.5 + 0.25
        mask[-1] = 0.0  # a dropped token too
    def prep(t):
        return None if t is None else t.to(dtype).to(DEVICE).requires_grad_()

    return (prep(hidden), prep(weight), prep(bias), targets.to(DEVICE),
            None if mask is None else mask.to(dtype).to(DEVICE))


def _kwargs(opts, reduction, mask, backend, bias):
    return dict(bias=bias, loss_mask=mask, reduction=reduction, backend=backend,
                label_smoothing=opts.get("label_smoothing", 0.0), softcap=opts.get("softcap"),
                z_loss=opts.get("z_loss", 0.0))


def _differentiable(bias, hidden, weight):
    """The tensors to differentiate: (hidden, weight) and the bias when there is one."""
    return (hidden, weight) if bias is None else (hidden, weight, bias)


# 'none' always takes the deferred path
PATHS = [("mean", "one_pass"), ("mean", "deferred"), ("sum", "one_pass"), ("sum", "deferred"),
         ("none", "deferred")]


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "auto_dense"])
@pytest.mark.parametrize("reduction,path", PATHS, indirect=["path"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_gradgradcheck_float64(case, reduction, path, backend):
    opts = OPTIONS[case]
    hidden, weight, bias, targets, mask = _inputs(opts, torch.float64)
    inputs = _differentiable(bias, hidden, weight)

    def fn(*args):
        h, w, *b = args
        return linear_cross_entropy(h, w, targets,
                                    **_kwargs(opts, reduction, mask, backend, b[0] if b else None))

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _second_order(loss_fn, inputs, vectors, grad_out):
    """First-order gradients (create_graph=True) and the Hessian-vector products
    d/d inputs of sum_i <grad_i, v_i>."""
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs, grad_out, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return grads, torch.autograd.grad(dot, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "everything", "token_scaling"])
def test_hessian_vector_products_every_backend(case, reduction, backend):
    """float32 inputs on every backend (one-pass and deferred paths alike) against float64
    autograd on materialised logits; the create_graph gradients equal the kernels' own."""
    opts = dict(OPTIONS["everything"] if case == "everything" else {})
    n, h, v = 9, 5, 37
    hidden, weight, bias, targets, mask = _inputs(opts, torch.float32, n, h, v)
    inputs = _differentiable(bias, hidden, weight)
    kw = _kwargs(opts, reduction, mask, backend, None)
    scaling = case == "token_scaling"
    vectors = [torch.randn_like(t) for t in inputs]
    grad_out = torch.rand(n, device=DEVICE) + 0.5 if reduction == "none" else None

    def ours(hh, ww, *b):
        return linear_cross_entropy(hh, ww, targets, **{**kw, "bias": b[0] if b else None},
                                    token_scaling=scaling)

    grads, hvp = _second_order(ours, inputs, vectors, grad_out)
    ref_kw = {k: val for k, val in kw.items() if k != "backend"}
    loss64, leaves = naive_lce64(hidden, weight, targets, **{**ref_kw, "bias": bias},
                                 token_scaling=scaling)  # float64 leaves of its own
    leaves = _differentiable(leaves[2], *leaves[:2])
    grads64, hvp64 = _second_order(lambda *_: loss64, leaves, [x.double() for x in vectors],
                                   None if grad_out is None else grad_out.double())
    plain = torch.autograd.grad(ours(*inputs), inputs, grad_out)  # the kernels' gradients
    for name, g, g64, p, s, s64 in zip("hwb", grads, grads64, plain, hvp, hvp64):
        assert_close64(g, g64, torch.float32, f"create_graph grad_{name}")
        assert_close64(p, g64, torch.float32, f"grad_{name}")
        assert_close64(s, s64, torch.float32, f"Hessian-vector product, {name}")


def _penalised(h, loss):
    return loss + 0.5 * (h * h).sum()


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "auto_dense"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reported_example_hessian(reduction, backend):
    """hidden 8 x 3, V = 4, loss + 0.5 ||h||^2: the full Hessian in h equals torch's
    (where the forward-computed gradient once gave the identity, the penalty's alone)."""
    hidden = torch.randn(8, 3, dtype=torch.float64)
    weight = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.randint(0, 4, (8,))

    def ours(h):
        loss = linear_cross_entropy(h, weight, targets, reduction=reduction, backend=backend)
        return _penalised(h, loss.mean() if reduction == "none" else loss)

    def theirs(h):
        loss = F.cross_entropy(F.linear(h, weight), targets,
                               reduction="none" if reduction == "none" else reduction)
        return _penalised(h, loss.mean() if reduction == "none" else loss)

    got = torch.autograd.functional.hessian(ours, hidden)
    want = torch.autograd.functional.hessian(theirs, hidden)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(want.reshape(24, 24), torch.eye(24, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reported_example_float32_every_backend(backend):
    """The same example on float32 inputs, for the kernels that take no float64."""
    hidden = torch.randn(8, 3, device=DEVICE)
    weight = torch.randn(4, 3, device=DEVICE)
    targets = torch.randint(0, 4, (8,), device=DEVICE)

    def hess(fn, h):
        h = h.detach().requires_grad_()
        g, = torch.autograd.grad(_penalised(h, fn(h)), h, create_graph=True)
        return torch.stack([torch.autograd.grad(g.reshape(-1)[i], h, retain_graph=True)[0]
                            for i in range(g.numel())])

    got = hess(lambda h: linear_cross_entropy(h, weight, targets, backend=backend), hidden)
    want = hess(lambda h: F.cross_entropy(F.linear(h, weight.double()), targets),
                hidden.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_backward_stays_on_the_kernels(backend, monkeypatch):
    """An ordinary backward never takes the differentiable path (no cost to it)."""
    from t3s_kernels import second_order
    calls = []
    real = second_order.loss_gradients
    monkeypatch.setattr(second_order, "loss_gradients",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, bias, targets, mask = _inputs(OPTIONS["everything"], torch.float32, 9, 5, 37)
    for reduction in REDUCTIONS:
        loss = linear_cross_entropy(hidden, weight, targets, bias=bias, loss_mask=mask,
                                    reduction=reduction, backend=backend)
        loss.sum().backward()
    assert not calls
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend)
    torch.autograd.grad(loss, hidden, create_graph=True)
    assert calls
