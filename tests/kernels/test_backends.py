"""The backend registry: one seam for every backend of the same op contract."""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from kernel_helpers import make_case

import t3s
import t3s_kernels
from t3s_kernels import linear_cross_entropy, target_logprobs
from t3s_kernels.backends import (Backend, get_backend, register_backend, registered_backends,
                                  resolve_backend, unregister_backend)


class Counting(Backend):
    """Delegates to the reference and counts the calls of each method."""

    name = "counting"

    def __init__(self, name="counting", priority=0, auto_devices=(), unavailable=None,
                 ineligible=None):
        self.name, self.priority, self.auto_devices = name, priority, auto_devices
        self.unavailable, self.ineligible = unavailable, ineligible
        self.calls = []
        self.ref = get_backend("torch")

    def unavailable_reason(self):
        return self.unavailable

    def check_inputs(self, hidden):
        if self.ineligible:
            raise ValueError(self.ineligible)

    def loss_forward(self, *args):
        self.calls.append("loss_forward")
        return self.ref.loss_forward(*args)

    def loss_backward(self, *args):
        self.calls.append("loss_backward")
        return self.ref.loss_backward(*args)

    def target_logprobs(self, *args, **kwargs):
        self.calls.append("target_logprobs")
        return self.ref.target_logprobs(*args, **kwargs)


@pytest.fixture
def counting():
    backend = register_backend(Counting())
    yield backend
    unregister_backend(backend.name)


def test_builtin_backends_are_registered():
    assert registered_backends()[:2] == ("torch", "triton")
    assert "torch" in t3s_kernels.available_backends()
    assert set(BACKENDS) <= set(registered_backends())
    assert t3s_kernels.BACKENDS == registered_backends()


def test_a_registered_backend_serves_every_entry_point(counting):
    h, w, y, _ = make_case(23, 16, 41, torch.float32, DEVICE)
    assert "counting" in t3s_kernels.available_backends()
    ref = linear_cross_entropy(h, w, y, backend="torch")
    loss = linear_cross_entropy(h, w, y, backend="counting")
    loss.backward()
    torch.testing.assert_close(loss, ref)
    target_logprobs(h, w, y, backend="counting")
    t3s.masked_ce(h, w, y, backend="counting")
    # 'mean' with a gradient wanted runs the default loss_forward_backward in the forward
    # (loss_forward, then loss_backward with grad_scale); masked_ce's too, though its
    # gradient is never asked for.
    assert counting.calls == ["loss_forward", "loss_backward", "target_logprobs", "loss_forward",
                              "loss_backward"]
    counting.calls.clear()
    linear_cross_entropy(h, w, y, backend="counting", reduction="none").sum().backward()
    with torch.no_grad():
        linear_cross_entropy(h, w, y, backend="counting")
    assert counting.calls == ["loss_forward", "loss_backward", "loss_forward"]


def test_patch_accepts_a_registered_backend(counting):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1)
    model = t3s.patch(transformers.LlamaForCausalLM(config), backend="counting")
    ids = torch.randint(0, 61, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert counting.calls == ["loss_forward", "loss_backward"]
    with pytest.raises(ValueError, match="backend must be one of .*'counting'"):
        t3s.patch(transformers.LlamaForCausalLM(config), backend="nope")


def test_automatic_choice_reads_the_registry(counting):
    h, w, y, _ = make_case(9, 8, 17, torch.float32, torch.device("cpu"))
    cpu_default = "cpp" if "cpp" in BACKENDS else "torch"  # the C++ kernels once built
    assert resolve_backend(None, h) == cpu_default
    counting.auto_devices, counting.priority = ("cpu",), 50
    assert resolve_backend(None, h) == "counting"
    counting.ineligible = "it does not like these inputs"
    with pytest.warns(UserWarning, match="not using the 'counting' backend .it does not like"):
        assert resolve_backend(None, h) == cpu_default


def test_unusable_backends_say_why(counting):
    h, w, y, _ = make_case(9, 8, 17, torch.float32, DEVICE)
    counting.unavailable = "its library is missing"
    assert "counting" not in t3s_kernels.available_backends()
    with pytest.raises(ValueError, match="backend='counting' is unavailable: its library is missing"):
        linear_cross_entropy(h, w, y, backend="counting")
    counting.unavailable, counting.ineligible = None, "tensors on a device it cannot use"
    with pytest.raises(ValueError, match="cannot run here: tensors on a device"):
        target_logprobs(h, w, y, backend="counting")
    assert counting.calls == []


def test_registration_errors(counting):
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Counting())
    with pytest.raises(TypeError, match="must be a t3s_kernels Backend"):
        register_backend(object())
    with pytest.raises(ValueError, match="non-empty string name"):
        register_backend(Counting(name=""))
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("nope")
    replacement = Counting()
    assert register_backend(replacement, replace=True) is get_backend("counting")
