"""Float64 references and input makers for the kernel tests.

`naive_lce64` materialises the full logits in float64 with plain autograd:
it shares no code with t3s_kernels, so it checks the reference backend too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (norm-relative error bound, allclose atol, allclose rtol) against float64.
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-4),
    torch.float16: (5e-3, 1e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-3, 5e-2),
    torch.float64: (1e-10, 1e-10, 1e-9),
}


def make_case(N, H, V, dtype, device, *, lead=None, peaked=False, bias=False,
              ignore_frac=0.0, ignore_index=-100, requires_grad=True):
    """Random hidden [N, H] (or [*lead, H]), weight [V, H], targets, optional bias.

    Logits are O(1) ("random"); `peaked` adds ~U(0, 16) to each target logit by
    moving hidden toward the target's weight row, as in real SFT outputs.
    """
    shape = tuple(lead) if lead is not None else (N,)
    n = 1
    for s in shape:
        n *= s
    weight = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2.0
    hidden = torch.randn(n, H, dtype=torch.float64)
    targets = torch.randint(0, V, (n,))
    if peaked:
        w_t = weight[targets]
        boost = torch.rand(n, 1, dtype=torch.float64) * 16.0
        hidden = hidden + boost * w_t / (w_t * w_t).sum(1, keepdim=True)
    if ignore_frac:
        targets[torch.rand(n) < ignore_frac] = ignore_index
    b = (torch.randn(V, dtype=torch.float64) * 0.5) if bias else None

    def prep(t):
        t = t.to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    hidden = prep(hidden.reshape(*shape, H))
    weight = prep(weight)
    b = prep(b) if b is not None else None
    return hidden, weight, targets.reshape(shape).to(device), b


def naive_lce64(hidden, weight, targets, *, bias=None, loss_mask=None, ignore_index=-100,
                reduction="mean", normalizer=None, label_smoothing=0.0, softcap=None,
                z_loss=0.0, keep_logits=False, token_scaling=False):
    """float64 loss and the float64 leaf tensors (h, w, b) to take gradients from.

    ``token_scaling`` (DFT): each token's loss times its stop-gradient p(y_t).

    With `keep_logits`, also returns the pre-softcap logits [N, V], whose `.grad`
    (after backward) is G, the operand of both backward GEMMs.
    """
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    H = h.shape[-1]
    z = F.linear(h.reshape(-1, H), w, b)
    logits = z
    if keep_logits:
        logits.retain_grad()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = targets.reshape(-1)
    keep = y != ignore_index
    wt = keep.double()
    if loss_mask is not None:
        wt = wt * loss_mask.reshape(-1).double()
    y_safe = torch.where(keep, y, torch.zeros_like(y))
    logp = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1)
    nll = -logp.gather(1, y_safe[:, None]).squeeze(1)
    per_token = (1 - label_smoothing) * nll - label_smoothing * logp.mean(1) + z_loss * lse**2
    if token_scaling:
        per_token = per_token * torch.exp(-nll).detach()
    contrib = torch.where(wt != 0, wt * per_token, torch.zeros_like(per_token))
    if reduction == "none":
        loss = contrib.view(targets.shape)
    elif normalizer is not None:
        loss = contrib.sum() / float(normalizer)
    elif reduction == "sum":
        loss = contrib.sum()
    else:
        loss = contrib.sum() / wt.sum() if wt.sum() > 0 else contrib.sum() * 0.0
    if keep_logits:
        return loss, (h, w, b), logits
    return loss, (h, w, b)


# Unit roundoff of a GEMM operand rounded to `dtype` (G is rounded to the input dtype
# before the backward GEMMs, as on tensor cores).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8,
                 torch.float64: 2.0**-53}


def gemm_term_scales(h64, w64, logits64):
    """Σ|terms| of each element of grad_hidden = G W and grad_weight = Gᵀ h, in float64.

    A dot product whose operands carry relative rounding u has error at most u·Σ|terms|;
    where terms cancel, this exceeds rtol·|result| by far, so an elementwise check
    must allow it (one bf16 grad_weight element is the difference of two ~3.0 terms).
    """
    g_abs = logits64.grad.detach().abs()
    h_abs = h64.detach().reshape(-1, h64.shape[-1]).abs()
    return (g_abs @ w64.detach().abs()).reshape(h64.shape), g_abs.T @ h_abs


def assert_close64(actual, expected, dtype, what, term_scale=None):
    """Norm-relative error and elementwise closeness against a float64 reference.

    `term_scale` (same shape; see `gemm_term_scales`) widens the elementwise bound by
    the rounding error a GEMM with operands in `dtype` may make on that element.
    """
    assert actual is not None, f"{what}: missing"
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    rel_bound, atol, rtol = TOL[dtype]
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rel_bound or (actual - expected).abs().max() <= atol, (
        f"{what}: relative error {err:.3e} > {rel_bound:.0e}")
    if term_scale is None:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what}: {m}")
        return
    # Elementwise: allclose plus twice the rounding bound of the GEMM operands.
    diff = (actual - expected).abs()
    allowed = atol + rtol * expected.abs() + 2 * UNIT_ROUNDOFF[dtype] * term_scale.double().cpu()
    worst = int((diff - allowed).argmax())
    assert (diff <= allowed).all(), (
        f"{what}: {(diff > allowed).sum().item()} / {diff.numel()} elements off; worst at flat "
        f"index {worst}: |diff| {diff.view(-1)[worst]:.3e} > allowed {allowed.view(-1)[worst]:.3e}")
