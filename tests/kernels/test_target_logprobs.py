"""target_logprobs: forward-only streaming log-probs, entropy and argmax vs float64."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from kernel_helpers import make_case

from t3s_kernels import TargetLogprobs, debug, linear_cross_entropy, reference, target_logprobs

N, H, V = 37, 48, 1000


def _expected(hidden, weight, targets, bias=None, softcap=None, ignore_index=-100):
    z = hidden.detach().double() @ weight.detach().double().T
    if bias is not None:
        z = z + bias.detach().double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0)
    return (logp.gather(-1, y[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1),
            z.argmax(-1), valid)


# Bounds on max abs error vs float64: fp32 accumulation in every dtype.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("extras", ["bias_softcap", "plain"])
def test_matches_float64(backend, dtype, extras):
    hidden, weight, targets, bias = make_case(N, H, V, dtype, DEVICE, requires_grad=False,
                                              bias=extras != "plain", ignore_frac=0.2,
                                              peaked=True)
    softcap = 10.0 if extras != "plain" else None
    out = target_logprobs(hidden, weight, targets, bias=bias, softcap=softcap,
                          return_entropy=True, return_argmax=True, backend=backend)
    assert isinstance(out, TargetLogprobs)
    lp, ent, am, valid = _expected(hidden, weight, targets, bias, softcap)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == targets.shape
    assert torch.isnan(out.logprobs[~valid]).all() and torch.isnan(out.entropy[~valid]).all()
    assert (out.argmax[~valid] == -1).all()
    err = (out.logprobs[valid].double() - lp[valid]).abs().max()
    assert err <= ATOL[dtype], f"log-prob max abs error {err:.2e}"
    torch.testing.assert_close(out.entropy[valid].double(), ent[valid], atol=ATOL[dtype] * 5,
                               rtol=1e-4)
    # argmax may only differ where two logits tie to within rounding.
    z = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    got_top = z.gather(1, out.argmax.clamp_min(0)[:, None]).squeeze(1)
    assert ((z.max(1).values - got_top)[valid] <= 1e-4).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_tensor_output_and_leading_dims(backend):
    hidden, weight, targets, _ = make_case(0, H, V, torch.float32, DEVICE, lead=(2, 9),
                                           requires_grad=False)
    out = target_logprobs(hidden, weight, targets, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 9)
    lp, _, _, _ = _expected(hidden, weight, targets)
    torch.testing.assert_close(out.double(), lp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_builds_no_graph(backend):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=True)
    out = target_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert out.logprobs.grad_fn is None and not out.logprobs.requires_grad
    assert out.entropy.grad_fn is None
    with torch.no_grad():
        again = target_logprobs(hidden, weight, targets, backend=backend)
    torch.testing.assert_close(again, out.logprobs)


def test_triton_vocab_splits_merge():
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable")
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=False)
    # Duplicate a column so that the argmax tie-break across splits is exercised.
    weight[700] = weight[3]
    debug.OVERRIDES.update(splits=4, block=(16, 64, 16))
    out = target_logprobs(hidden, weight, targets, return_entropy=True, return_argmax=True,
                          backend="triton")
    lp, ent, am, _ = _expected(hidden, weight, targets)
    torch.testing.assert_close(out.logprobs.double(), lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ent, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax, am)  # torch.argmax: first index on ties


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_argmax(backend):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=False)
    out = target_logprobs(hidden, weight, targets, return_argmax=True, backend=backend)
    assert out.entropy is None and out.argmax.dtype == torch.int64
    assert torch.equal(out.argmax, _expected(hidden, weight, targets)[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_gives_nan(backend):
    hidden, weight, targets, _ = make_case(N, H, V, torch.float32, DEVICE, requires_grad=False)
    hidden[4, 0] = float("nan")
    out = target_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(out[4]) and torch.isfinite(out[torch.arange(N) != 4]).all()


def _peaked_and_flat(n=64, h=32, v=128):
    """TRL's entropy-test sizes, float32: rows 0::4 nearly flat (entropy ~ log V), the
    others peaked (a target logit up to ~16 above the rest), every logit offset by ~40
    through the bias, so that |lse| is far above the entropy, as in real LM heads."""
    hidden, weight, targets, bias = make_case(n, h, v, torch.float32, DEVICE,
                                              requires_grad=False, bias=True, peaked=True)
    w_t = weight[targets]  # 10 more on every target logit: surely peaked
    hidden += 10.0 * w_t / (w_t * w_t).sum(1, keepdim=True)
    hidden[0::4] *= 1e-2
    return hidden, weight, targets, bias + 40.0


@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_entropy_exact_on_peaked_and_flat_rows(backend):
    """Every backend's entropy, and the automatic dense path's, against float64 of the same
    float32 inputs at TRL's atol = rtol = 1e-5: target_logprobs, and the statistics of the
    loss on both its paths (gradient in the forward, or no gradient)."""
    hidden, weight, targets, bias = _peaked_and_flat()
    _, want, _, _ = _expected(hidden, weight, targets, bias)
    assert want[1::4].min() < 0.1 and want[0::4].min() > 4.0  # peaked and flat rows
    overrides = [{}] + ([dict(splits=4, block=(16, 32, 16))] if backend == "triton" else [])
    for override in overrides:  # the Triton kernels also over 4 merged vocabulary splits
        debug.OVERRIDES.update(override)
        got = [target_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                               backend=backend).entropy]
        for grad in (False, True):
            h = hidden.clone().requires_grad_(grad)
            got.append(linear_cross_entropy(h, weight, targets, bias=bias, return_stats=True,
                                            backend=backend)[1].entropy)
        for entropy in got:
            torch.testing.assert_close(entropy.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_entropy_does_not_cancel():
    """float32 logits ~1000 with one dominant entry per row: the entropy (~1e-3 down to
    ~1e-7) of the reference is exact to float32 rounding of the entropy itself; merged
    vocabulary blocks (the Triton splits' and the vocab-parallel shards' merge) to the
    rounding of sum e^(z - max) ~ 1. lse - sum p z would err by ~ulp(1000) = 6e-5."""
    z = torch.randn(16, 200) * 2.0 + 1000.0
    z[torch.arange(16), torch.randint(0, 200, (16,))] += torch.linspace(8.0, 20.0, 16)
    logp = torch.log_softmax(z.double(), 1)
    want = -(logp.exp() * logp).sum(1)
    torch.testing.assert_close(reference.row_entropy(z).double(), want, atol=1e-8, rtol=1e-5)
    blocks = z.split(64, dim=1)  # partials as the kernels leave them, [S, M] each
    m = torch.stack([b.max(1).values for b in blocks])
    e = [torch.exp(b - mb[:, None]) for b, mb in zip(blocks, m)]
    s = torch.stack([x.sum(1) for x in e])
    ez = torch.stack([(x * (b - mb[:, None])).sum(1) for x, b, mb in zip(e, blocks, m)])
    entropy = reference.merge_partials(m, s, ez=ez)[3]
    torch.testing.assert_close(entropy.double(), want, atol=5e-7, rtol=1e-5)
