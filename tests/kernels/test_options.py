"""logit_scale, temperature and class_weight against float64 references built from
``F.cross_entropy`` on materialised logits.

The logit map is z = softcap(logit_scale * (h W^T + b)) / temperature; class weights are
``F.cross_entropy``'s ``weight=`` (the targets' weights in the 'mean' denominator, label
smoothing weighted per class), here together with ignore_index, float loss masks, label
smoothing and z-loss. Every CPU path runs: the 'torch' reference, the C++ kernels and the
Triton kernels (interpreted, tests/conftest.py), each one-pass (gradient in the forward)
and deferred, and the dense path of small CPU problems (backend=None); loss and every
gradient, fp32 and bf16, odd shapes, fresh random inputs, NaN-poisoned kernel outputs.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE
from kernel_helpers import assert_close64, gemm_term_scales, make_case

from t3s_kernels import debug, linear_cross_entropy, target_logprobs
from t3s_kernels.backends import get_backend

N, H, V = 29, 13, 67  # odd sizes: no dimension is a multiple of a block

PATHS = ([("torch", "one_pass")]
         + ([("cpp", "one_pass"), ("cpp", "deferred")] if "cpp" in BACKENDS else [])
         + ([("triton", "one_pass"), ("triton", "deferred")] if "triton" in BACKENDS else [])
         + [(None, "dense")])
IDS = [f"{b or 'auto'}-{m}" for b, m in PATHS]

SCALE_CASES = {
    # scale, softcap and temperature together, with everything else
    "mean_softcap": dict(logit_scale=1.7, temperature=0.6, softcap=4.0, bias=True, mask=True,
                         ignore_frac=0.2, label_smoothing=0.1, z_loss=1e-3),
    # no softcap: the plain multiply; a per-token grad_output
    "none_plain": dict(logit_scale=0.8, temperature=1.9, reduction="none", ignore_frac=0.2),
    # the temperature alone, exact (filter_eps=None: the kernels' GEMM / dense modes)
    "sum_temperature_exact": dict(temperature=0.7, softcap=3.0, reduction="sum",
                                  filter_eps=None, bias=True),
}
CLASS_CASES = {
    # F.cross_entropy's weight= with ignore_index and label smoothing, no mask
    "mean_smoothing": dict(ignore_frac=0.25, label_smoothing=0.2),
    # float mask weights, bias, softcap, scale / temperature and z-loss on top
    "mean_everything": dict(mask=True, ignore_frac=0.2, label_smoothing=0.1, bias=True,
                            softcap=5.0, logit_scale=1.3, temperature=0.8, z_loss=1e-3),
    "none_smoothing": dict(reduction="none", ignore_frac=0.2, label_smoothing=0.3, mask=True),
    "sum_exact": dict(reduction="sum", label_smoothing=0.1, filter_eps=None, bias=True),
}
LOSS_KEYS = ("reduction", "label_smoothing", "softcap", "z_loss", "logit_scale", "temperature",
             "filter_eps")


def _inputs(dtype, case, class_weight=False):
    hidden, weight, targets, bias = make_case(N, H, V, dtype, DEVICE, bias=case.get("bias", False),
                                              ignore_frac=case.get("ignore_frac", 0.0))
    kw = {k: case[k] for k in LOSS_KEYS if k in case}
    kw["bias"] = bias
    if case.get("mask"):  # float weights in (0, 2), about a quarter of them 0
        mask = torch.rand(targets.shape, device=DEVICE) * 2.0 + 0.01
        mask[torch.rand(targets.shape, device=DEVICE) < 0.25] = 0.0
        kw["loss_mask"] = mask
    if class_weight:  # some classes weigh 0: their rows still carry the smoothing term
        cw = torch.rand(V, device=DEVICE) * 2.0
        cw[torch.rand(V, device=DEVICE) < 0.1] = 0.0
        kw["class_weight"] = cw
    return hidden, weight, targets, kw


def reference64(hidden, weight, targets, *, bias=None, loss_mask=None, reduction="mean",
                label_smoothing=0.0, softcap=None, z_loss=0.0, logit_scale=1.0,
                temperature=1.0, class_weight=None, **_):
    """float64 loss, its leaves (h, w, b) and the raw logits (whose .grad is G), from
    F.cross_entropy on z = softcap(logit_scale * r) / temperature."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    r = F.linear(h, w, b)
    r.retain_grad()
    z = r * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    cw = None if class_weight is None else class_weight.double()
    ce = dict(weight=cw, ignore_index=-100, label_smoothing=label_smoothing)
    if loss_mask is None and not z_loss and reduction != "none":
        return F.cross_entropy(z, targets, reduction=reduction, **ce), (h, w, b), r
    kept = targets != -100
    m = kept.double() if loss_mask is None else loss_mask.double() * kept
    per = F.cross_entropy(z, targets, reduction="none", **ce)  # 0 where ignored
    per = per + z_loss * torch.logsumexp(z, 1) ** 2 * kept
    total = per * m
    if reduction == "none":
        return total, (h, w, b), r
    if reduction == "sum":
        return total.sum(), (h, w, b), r
    a_y = cw[targets.clamp(min=0)] if cw is not None else torch.ones_like(m)
    return total.sum() / (m * a_y).sum(), (h, w, b), r


def _set_mode(backend, mode, reduction, monkeypatch):
    if mode == "deferred":
        monkeypatch.setitem(debug.OVERRIDES, "grad_in_forward", False)
    if backend == "cpp":  # several row blocks and vocabulary tiles
        monkeypatch.setitem(debug.OVERRIDES, "cpu_block", (8, 32))
    if mode == "one_pass" and backend in ("cpp", "triton") and reduction != "none":
        def no_deferred_backward(*args, **kwargs):
            raise AssertionError("the one-pass path ran the deferred backward")
        monkeypatch.setattr(get_backend(backend), "loss_backward", no_deferred_backward)


def _check(backend, dtype, hidden, weight, targets, kw):
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend, **kw)
    ref, (h64, w64, b64), r64 = reference64(hidden, weight, targets, **kw)
    grad_out = torch.randn_like(ref) if kw.get("reduction") == "none" else torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype))
    ref.backward(grad_out)
    assert loss.dtype == torch.float32
    assert_close64(loss, ref, torch.float32 if dtype == torch.float32 else dtype, "loss")
    scale_h, scale_w = gemm_term_scales(h64, w64, r64)
    assert_close64(hidden.grad, h64.grad, dtype, "grad_hidden", term_scale=scale_h)
    assert_close64(weight.grad, w64.grad, dtype, "grad_weight", term_scale=scale_w)
    if kw["bias"] is not None:
        assert_close64(kw["bias"].grad, b64.grad, dtype, "grad_bias")


@pytest.mark.parametrize("backend,mode", PATHS, ids=IDS)
@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scale_and_temperature_match_float64(backend, mode, case, monkeypatch):
    # bf16 on one case: the fp32 ones pin the formulas, bf16 the operand path
    dtype = torch.bfloat16 if case == "mean_softcap" else torch.float32
    _set_mode(backend, mode, SCALE_CASES[case].get("reduction", "mean"), monkeypatch)
    _check(backend, dtype, *_inputs(dtype, SCALE_CASES[case]))


@pytest.mark.parametrize("backend,mode", PATHS, ids=IDS)
@pytest.mark.parametrize("case", list(CLASS_CASES))
def test_class_weight_matches_float64(backend, mode, case, monkeypatch):
    dtype = torch.bfloat16 if case == "mean_everything" else torch.float32
    _set_mode(backend, mode, CLASS_CASES[case].get("reduction", "mean"), monkeypatch)
    _check(backend, dtype, *_inputs(dtype, CLASS_CASES[case], class_weight=True))


@pytest.mark.parametrize("backend", [b for b, m in PATHS if m != "deferred"],
                         ids=lambda b: b or "auto")
def test_target_logprobs_scale_and_temperature(backend):
    hidden, weight, targets, bias = make_case(N, H, V, torch.float32, DEVICE, bias=True,
                                              ignore_frac=0.2, requires_grad=False)
    out = target_logprobs(hidden, weight, targets, bias=bias, softcap=3.0, logit_scale=1.4,
                          temperature=0.7, return_entropy=True, backend=backend)
    z = 3.0 * torch.tanh(1.4 * F.linear(hidden.double(), weight.double(), bias.double()) / 3.0)
    logp = torch.log_softmax(z / 0.7, 1)
    kept = targets != -100
    want = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    assert_close64(out.logprobs[kept], want[kept], torch.float32, "logprobs")
    assert_close64(out.entropy[kept], -(logp.exp() * logp).sum(1)[kept], torch.float32,
                   "entropy")
    assert out.logprobs[~kept].isnan().all()


@pytest.mark.parametrize("backend", [b for b, m in PATHS if m != "deferred"],
                         ids=lambda b: b or "auto")
def test_defaults_leave_the_loss_unchanged(backend):
    """logit_scale=temperature=1 is the default path, bit for bit; unit class weights give
    the unweighted loss."""
    torch.manual_seed(5)
    hidden, weight, targets, kw = _inputs(torch.bfloat16, CLASS_CASES["mean_everything"])
    kw.update(logit_scale=1.0, temperature=1.0)
    plain = {k: v for k, v in kw.items() if k not in ("logit_scale", "temperature")}
    a = linear_cross_entropy(hidden, weight, targets, backend=backend, **plain)
    b = linear_cross_entropy(hidden, weight, targets, backend=backend, **kw)
    assert torch.equal(a, b)
    ones = linear_cross_entropy(hidden, weight, targets, backend=backend,
                                class_weight=torch.ones(V), **kw)
    torch.testing.assert_close(ones, a, rtol=1e-5, atol=1e-6)


def test_second_order_with_options():
    """create_graph=True: the differentiable gradient path knows the options too."""
    hidden, weight, targets, bias = make_case(5, 3, 7, torch.float64, DEVICE, bias=True,
                                              ignore_frac=0.2)
    cw = torch.rand(7, dtype=torch.float64) + 0.1
    opts = dict(softcap=2.0, logit_scale=1.3, temperature=0.7, label_smoothing=0.1,
                class_weight=cw, z_loss=1e-2)
    for reduction in ("mean", "none"):
        def f(h, w, b):
            out = linear_cross_entropy(h, w, targets, bias=b, backend="torch",
                                       reduction=reduction, **opts)
            return out.sum() if reduction == "none" else out
        torch.autograd.gradgradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature must be a positive"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be a positive"),
    (dict(logit_scale=True), TypeError, "logit_scale must be a number"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(class_weight=torch.ones(V + 1)), ValueError, r"class_weight must have shape \[V\]"),
    (dict(class_weight=torch.ones(V, dtype=torch.long)), TypeError, "floating-point"),
    (dict(class_weight=[1.0] * V), TypeError, "must be a torch.Tensor"),
    (dict(class_weight=torch.ones(V, device="meta")), ValueError, "class_weight is on meta"),
    (dict(class_weight=torch.ones(V, requires_grad=True)), ValueError, "must not require grad"),
])
def test_bad_options_raise_before_any_work(kwargs, error, match, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("a kernel ran before the checks")
    monkeypatch.setattr(get_backend("torch"), "loss_forward", no_work)
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE)
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, targets, backend="torch", **kwargs)
    if "class_weight" not in kwargs:
        with pytest.raises(error, match=match):
            target_logprobs(hidden, weight, targets, backend="torch", **kwargs)
