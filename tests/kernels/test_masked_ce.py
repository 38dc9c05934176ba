"""t3s.masked_ce: the drop-in loss contract (F.cross_entropy's arguments, plus a loss mask)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE
from kernel_helpers import make_case

import t3s

B, T, H, V = 3, 13, 48, 1000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_no_mask_equals_f_cross_entropy(backend, reduction, smoothing):
    hidden, weight, labels, bias = make_case(0, H, V, torch.float32, DEVICE, lead=(B, T),
                                             bias=True, ignore_frac=0.2)
    loss = t3s.masked_ce(hidden, weight, labels, reduction=reduction, label_smoothing=smoothing,
                         bias=bias, backend=backend)
    grad_out = torch.rand(B, T, device=DEVICE) if reduction == "none" else None
    loss.backward(grad_out)
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(),
                          reduction=reduction, label_smoothing=smoothing)
    ref = ref.view(B, T) if reduction == "none" else ref
    ref.backward(grad_out)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, t in zip(ours, (hidden, weight, bias)):
        torch.testing.assert_close(got, t.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_mask_equals_dropped_labels_bf16(backend):
    hidden, weight, labels, _ = make_case(0, H, V, torch.bfloat16, DEVICE, lead=(B, T))
    mask = torch.rand(B, T, device=DEVICE) < 0.5
    loss = t3s.masked_ce(hidden, weight, labels, mask, backend=backend, filter_eps=None)
    loss.backward()
    ours = (hidden.grad.float(), weight.grad.float())
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(F.linear(hidden.float(), weight.float()).flatten(0, 1),
                          torch.where(mask, labels, -100).flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[0], hidden.grad.float(), atol=5e-3, rtol=5e-2)
    torch.testing.assert_close(ours[1], weight.grad.float(), atol=5e-3, rtol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_weights_and_normalizer(backend):
    """Weighted mean is sum(w l) / sum(w); normalizer replaces the denominator, so two
    accumulated micro-batches with normalizer = total kept tokens equal the full batch."""
    hidden, weight, labels, _ = make_case(0, H, V, torch.float32, DEVICE, lead=(2, T))
    w = torch.rand(2, T, device=DEVICE)
    per_token = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(),
                                reduction="none").view(2, T)
    expected = (w * per_token).sum() / w.sum()
    got = t3s.masked_ce(hidden, weight, labels, w, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.backward()
    full = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    total = w.sum()
    for i in range(2):  # gradient accumulation over two micro-batches
        (t3s.masked_ce(hidden[i], weight, labels[i], w[i], normalizer=total, backend=backend)).backward()
    torch.testing.assert_close(hidden.grad, full[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(weight.grad, full[1], atol=1e-6, rtol=1e-4)


def test_masked_tokens_get_no_gradient():
    """Changing the labels of dropped tokens changes nothing, bit for bit."""
    hidden, weight, labels, _ = make_case(0, H, V, torch.float32, DEVICE, lead=(B, T))
    mask = torch.rand(B, T, device=DEVICE) < 0.5
    results = []
    for trial in range(2):
        lab = labels.clone()
        if trial:
            lab[~mask] = torch.randint(0, V, (int((~mask).sum()),), device=DEVICE)
        hidden.grad = weight.grad = None
        loss = t3s.masked_ce(hidden, weight, lab, mask, backend="torch")
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
