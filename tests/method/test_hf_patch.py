"""t3s.hf: the generic fused-loss patch for Hugging Face causal LMs, fed by t3s.data's collator.

Tiny models are built from configs (no downloads). The patched model is
compared with the same model unpatched, which computes HF's own loss from
materialised logits.
"""

import copy
import inspect
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from t3s.data import PaddedCollator  # noqa: E402
from t3s.hf import (  # noqa: E402
    count_loss_items, is_patched, patch, shift_for_causal_lm, unpatch)

V = 101
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)


def _configs():
    T = transformers
    return {
        "llama": lambda: T.LlamaConfig(**COMMON),
        "qwen2-tied": lambda: T.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=8),
        "mistral": lambda: T.MistralConfig(**COMMON),
        # softcap small enough to bend the tiny model's logits
        "gemma2-softcap": lambda: T.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.5),
        "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0),
        "phi-bias": lambda: T.PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0),
        "cohere-scale": lambda: T.CohereConfig(**COMMON, logit_scale=0.25, bos_token_id=0,
                                               eos_token_id=1, pad_token_id=0),
        "granite-scale": lambda: T.GraniteConfig(**COMMON, logits_scaling=8.0),
        # a mixture of experts whose loss includes the router's load-balancing term
        "mixtral-aux": lambda: T.MixtralConfig(**COMMON, num_local_experts=4,
                                               num_experts_per_tok=2, output_router_logits=True,
                                               router_aux_loss_coef=0.1),
    }


CONFIGS = _configs()
ARCHS = list(CONFIGS)


def make_model(arch, train=True):
    config = CONFIGS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float()
    model.train(train)
    return model


def make_batch(B=3, T=10, pad=3):
    ids = torch.randint(0, V, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, T - pad:] = 0  # right padding in row 1
    labels = ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :2] = -100  # a prompt
    return ids, attention_mask, labels


def random_mask(labels, p=0.5):
    mask = torch.rand(labels.shape) > p
    mask[0, 3] = True  # at least one kept token (labels[0, 3] is not ignored)
    return mask


def step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grads_close(g, g_ref, **tol):
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=lambda m: f"{name}: {m}", **tol)


def patch_matches_unpatched(model, **inputs):
    """One step before and after `patch(model, backend="torch")` on the same inputs: the
    loss and every parameter gradient must match. Returns (ref, out, grads): the two
    outputs and the patched model's gradients by parameter name."""
    ref, g_ref = step(model, **inputs)
    patch(model, backend="torch")
    out, g = step(model, **inputs)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g, g_ref, rtol=1e-4, atol=1e-6)
    return ref, out, g


def assert_grads_equal(g, g_ref):
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert torch.equal(g[name], g_ref[name]), name


def cache_of(out):
    return getattr(out, "cache", None) if "cache" in out.keys() else out.get("past_key_values")


def cache_kwarg(model):
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ------------------------------------------------------------------------------------------
# Equivalence with the unpatched model
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_grads_match_unpatched(arch):
    model = make_model(arch)
    ids, am, labels = make_batch()
    ref, out, g = patch_matches_unpatched(model, input_ids=ids, attention_mask=am, labels=labels)
    info = model._t3s_patch
    assert ref.logits is not None
    assert out.logits is None  # training: no [B, T, V] logits
    # What the probe measured matches each architecture's documented logit map.
    config = model.config
    expected_scale = (config.logit_scale if arch == "cohere-scale"
                      else 1.0 / config.logits_scaling if arch == "granite-scale" else 1.0)
    assert info.head.verified
    assert info.head.logit_scale == pytest.approx(expected_scale, rel=1e-5)
    assert info.head.softcap == (0.5 if arch == "gemma2-softcap" else None)
    head = model.get_output_embeddings()
    if arch in ("qwen2-tied", "gemma2-softcap", "gpt2"):
        assert head.weight is model.get_input_embeddings().weight
    if arch == "phi-bias":
        assert head.bias is not None and "lm_head.bias" in g
    if arch == "mixtral-aux":
        assert out.aux_loss is not None and out.aux_loss > 0


def _multimodal_config(kind):
    T = transformers
    text = dict(COMMON, head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=28, patch_size=14)
    if kind == "llava":
        return T.LlavaConfig(text_config=T.LlamaConfig(**text),
                             vision_config=T.CLIPVisionConfig(**vision), image_token_index=100)
    # Gemma3's text config has a softcap that Gemma3ForConditionalGeneration does not apply:
    # the probe must notice and follow the model, not the config.
    return T.Gemma3Config(text_config=T.Gemma3TextConfig(**text, final_logit_softcapping=0.5),
                          vision_config=T.SiglipVisionConfig(**vision), mm_tokens_per_image=4,
                          image_token_index=100, boi_token_index=98, eoi_token_index=99)


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_multimodal_wrappers_text_only(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForImageTextToText.from_config(_multimodal_config(kind))
    model = model.float().train()
    ids, am, labels = make_batch()
    ids = ids % 90  # no image placeholder tokens
    labels = torch.where(labels == -100, labels, ids)
    _, out, _ = patch_matches_unpatched(model, input_ids=ids, attention_mask=am, labels=labels)
    assert model._t3s_patch.head.softcap is None
    assert out.logits is None


def test_gradient_checkpointing():
    model = make_model("qwen3")
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ids, am, labels = make_batch()
    patch_matches_unpatched(model, input_ids=ids, attention_mask=am, labels=labels)


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap", "phi-bias", "cohere-scale"])
def test_masked_tokens_contribute_nothing(arch):
    model = make_model(arch)
    patch(model, backend="torch")
    ids, am, labels = make_batch()
    mask = random_mask(labels)
    out, g = step(model, input_ids=ids, attention_mask=am, labels=labels, loss_mask=mask)

    # Changing the labels of dropped tokens changes nothing, bit for bit.
    perturbed = torch.where(mask, labels, torch.randint(0, V, labels.shape))
    out2, g2 = step(model, input_ids=ids, attention_mask=am, labels=perturbed, loss_mask=mask)
    assert torch.equal(out.loss, out2.loss)
    assert_grads_equal(g2, g)

    # A 0/1 mask is the same as ignoring those labels in plain HF.
    unpatch(model)
    ref, g_ref = step(model, input_ids=ids, attention_mask=am,
                      labels=torch.where(mask, labels, torch.full_like(labels, -100)))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_float_mask_weights_tokens():
    model = make_model("gemma2-softcap")
    ids, am, labels = make_batch()
    weights = torch.rand(labels.shape) * 2
    logits = model(input_ids=ids, attention_mask=am).logits.detach()
    patch(model, backend="torch")
    out = model(input_ids=ids, attention_mask=am, labels=labels, loss_mask=weights)

    targets, w = shift_for_causal_lm(labels, weights)
    tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            reduction="none", ignore_index=-100)
    w = w.flatten() * (targets.flatten() != -100)
    torch.testing.assert_close(out.loss, (w * tok).sum() / w.sum(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_with_num_items_in_batch():
    model = make_model("llama")
    ids, am, labels = make_batch(B=4, T=10)
    labels[3, 6:] = -100
    mask = torch.rand(labels.shape) * (torch.rand(labels.shape) > 0.3)
    mask[0, 3] = 1.0

    # HF's own accumulation semantics, unpatched: sum over micro-batches of sum(l) / N_total.
    n_items = count_loss_items(labels)
    assert n_items == (labels[:, 1:] != -100).sum()  # what HF's Trainer counts
    hf_parts = [step(model, input_ids=ids[s], attention_mask=am[s], labels=labels[s],
                     num_items_in_batch=n_items) for s in (slice(0, 2), slice(2, 4))]

    patch(model, backend="torch")
    for loss_mask in (None, mask):
        full, g_full = step(model, input_ids=ids, attention_mask=am, labels=labels,
                            loss_mask=loss_mask)
        n = count_loss_items(labels, loss_mask)
        parts = []
        for s in (slice(0, 2), slice(2, 4)):
            parts.append(step(model, input_ids=ids[s], attention_mask=am[s], labels=labels[s],
                              loss_mask=None if loss_mask is None else loss_mask[s],
                              num_items_in_batch=n))
        torch.testing.assert_close(parts[0][0].loss + parts[1][0].loss, full.loss,
                                   rtol=1e-5, atol=1e-6)
        summed = {k: parts[0][1][k] + parts[1][1][k] for k in g_full}
        assert_grads_close(summed, g_full, rtol=1e-4, atol=1e-6)
        if loss_mask is None:
            for (o, g), (o_hf, g_hf) in zip(parts, hf_parts):
                torch.testing.assert_close(o.loss, o_hf.loss, rtol=1e-5, atol=1e-6)
                assert_grads_close(g, g_hf, rtol=1e-4, atol=1e-6)


def test_packed_batch_with_position_ids():
    model = make_model("llama")
    ids = torch.randint(0, V, (1, 11))
    position_ids = torch.cat([torch.arange(5), torch.arange(6)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, 5] = -100  # first token of the second sequence: no cross-boundary target
    patch_matches_unpatched(model, input_ids=ids, position_ids=position_ids, labels=labels)


# ------------------------------------------------------------------------------------------
# Without labels: the original forward; generation; evaluation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap", "gpt2", "granite-scale"])
def test_generation_and_logits_unchanged(arch):
    model = make_model(arch, train=False)
    ids = torch.randint(2, V, (2, 5))
    am = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen_ref = model.generate(ids, attention_mask=am, **kwargs)
        logits_ref = model(input_ids=ids, attention_mask=am).logits
        patch(model, backend="torch")
        gen = model.generate(ids, attention_mask=am, **kwargs)
        logits = model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(gen, gen_ref)
    assert torch.equal(logits, logits_ref)


def test_eval_with_labels_returns_logits():
    model = make_model("gemma2-softcap", train=False)
    ids, am, labels = make_batch()
    ref = model(input_ids=ids, attention_mask=am, labels=labels)
    patch(model, backend="torch")
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert torch.equal(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert model(input_ids=ids, labels=labels, t3s_fused_loss=True).logits is None
    model.train()
    assert model(input_ids=ids, labels=labels, t3s_fused_loss=False).logits is not None
    assert model(input_ids=ids, labels=labels).logits is None
    # return_dict=False gives the tuple, loss first
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.is_tensor(tup[0]) and tup[0].dim() == 0


def test_cache_passes_through():
    model = make_model("llama", train=False)
    ids = torch.randint(0, V, (2, 7))
    key = cache_kwarg(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = model(input_ids=ids[:, :6], use_cache=True)
        ref = model(input_ids=ids[:, 6:], **{key: cache_of(first)}).logits
        patch(model, backend="torch")
        first = model(input_ids=ids[:, :6], labels=ids[:, :6], use_cache=True)
        assert first.loss is not None and cache_of(first) is not None
        nxt = model(input_ids=ids[:, 6:], **{key: cache_of(first)}).logits
    assert torch.equal(nxt, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_token_stats_alignment(arch):
    model = make_model(arch)
    ids, am, labels = make_batch()
    mask = random_mask(labels)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=am).logits.detach().float(), -1)
    patch(model, backend="torch")
    out = model(input_ids=ids, attention_mask=am, labels=labels, loss_mask=mask,
                return_token_stats=True)
    stats = out.token_stats
    assert out["token_stats"] is stats
    assert stats.target_logprob.shape == labels.shape
    # The stat at position i belongs to the target labels[:, i + 1].
    kept = (labels[:, 1:] != -100) & mask[:, 1:]
    expected = logp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    got = stats.target_logprob[:, :-1]
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-5)
    assert torch.isnan(got[~kept]).all() and torch.isnan(stats.target_logprob[:, -1]).all()
    assert torch.equal(stats.argmax_correct[:, :-1][kept],
                       (logp[:, :-1].argmax(-1) == labels[:, 1:])[kept])
    # engines rebuild the output from its items (DDP with find_unused_parameters does):
    # token_stats is a field of the output class, which stays the model's own
    rebuilt = type(out)(**dict(out.items()))
    assert rebuilt.token_stats is stats and isinstance(out, type(model.__class__.forward(
        model, input_ids=ids, attention_mask=am)))
    assert out.to_tuple()[-1] is stats


def test_autocast_bf16():
    model = make_model("llama")
    ids, am, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
        patch(model, backend="torch")
        out = model(input_ids=ids, attention_mask=am, labels=labels).loss
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=2e-2, atol=2e-2)


def test_triton_backend_tiny(monkeypatch):
    pytest.importorskip("triton")
    import t3s_kernels
    from t3s_kernels.backends import get_backend
    if "triton" not in t3s_kernels.available_backends():
        pytest.skip("Triton backend unavailable")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    model = make_model("llama")
    ids = torch.randint(0, V, (2, 6))
    labels = ids.clone()
    labels[0, :2] = -100
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ref, g_ref = step(model, input_ids=ids,
                      labels=torch.where(mask, labels, torch.full_like(labels, -100)))
    calls = []
    triton_backend = get_backend("triton")
    # the mean loss with a gradient runs loss_forward_backward (gradient in the forward)
    for method in ("loss_forward", "loss_forward_backward"):
        kernel = getattr(triton_backend, method)
        monkeypatch.setattr(triton_backend, method,
                            lambda *a, _k=kernel, **k: calls.append(1) or _k(*a, **k))
    patch(model, backend="triton", filter_eps=None)
    out, g = step(model, input_ids=ids, labels=labels, loss_mask=mask)
    assert calls  # the Triton kernels ran (interpreted on CPU)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    assert_grads_close(g, g_ref, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------
# patch / unpatch mechanics and errors
# ------------------------------------------------------------------------------------------


def test_unpatch_restores_the_forward():
    model = make_model("llama")
    ids, am, labels = make_batch()
    assert "forward" not in model.__dict__ and not is_patched(model)
    patch(model)
    assert is_patched(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model)
    unpatch(model)
    assert "forward" not in model.__dict__ and not is_patched(model)
    assert model(input_ids=ids, labels=labels).logits is not None
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)

    # An instance-level wrapper installed earlier (accelerate does this) survives.
    def wrapper(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    model.forward = types.MethodType(wrapper, model)
    prior = model.forward
    patch(model)
    assert model(input_ids=ids, labels=labels).logits is None
    unpatch(model)
    assert model.forward is prior
    # Wrapping after the patch must be undone first.
    patch(model)
    model.forward = types.MethodType(wrapper, model)
    with pytest.raises(RuntimeError, match="replaced after t3s.patch"):
        unpatch(model)


def test_signature_keeps_trainer_columns():
    model = patch(make_model("llama"))
    params = inspect.signature(model.forward).parameters
    for name in ("input_ids", "attention_mask", "labels", "loss_mask", "return_token_stats",
                 "example_id"):
        assert name in params
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())
    assert "self" not in params
    # example_id is accepted (the Trainer keeps that column) and never reaches the model
    ids, am, labels = make_batch()
    with_ids = model(input_ids=ids, labels=labels, example_id=torch.arange(ids.shape[0])).loss
    torch.testing.assert_close(with_ids, model(input_ids=ids, labels=labels).loss)


def test_deepcopy_of_patched_model():
    model = patch(make_model("llama"), backend="torch")
    clone = copy.deepcopy(model)
    ids, am, labels = make_batch()
    out = clone(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, model(input_ids=ids, attention_mask=am,
                                               labels=labels).loss)
    assert clone.forward.model is clone
    assert clone.get_output_embeddings().forward.module is clone.get_output_embeddings()
    # the copy unpatches on its own and generates like an unpatched model
    unpatch(clone)
    clone.eval()
    reference = make_model("llama").eval()
    reference.load_state_dict(clone.state_dict())
    prompt = ids[:1, :4]
    assert torch.equal(clone.generate(prompt, max_new_tokens=3, do_sample=False),
                       reference.generate(prompt, max_new_tokens=3, do_sample=False))
    assert is_patched(model)


def test_patched_model_pickles_and_keeps_its_state_dict(tmp_path):
    model = patch(make_model("llama"), backend="torch")
    keys = list(make_model("llama").state_dict())
    assert list(model.state_dict()) == keys  # the patch adds no parameters or buffers
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids, am, labels = make_batch()
    assert is_patched(loaded)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=am, labels=labels).loss,
                               model(input_ids=ids, attention_mask=am, labels=labels).loss)
    unpatch(loaded)
    assert "forward" not in loaded.__dict__
    assert "forward" not in loaded.get_output_embeddings().__dict__
    assert loaded(input_ids=ids, attention_mask=am).logits.shape[-1] == V


def test_argument_errors():
    model = make_model("llama")
    ids, am, labels = make_batch()
    with pytest.raises(TypeError, match="unknown loss option"):
        patch(model, normalizer=3)
    with pytest.raises(ValueError, match="reduction"):
        patch(model, reduction="none")
    with pytest.raises(ValueError, match="no output embedding"):
        patch(transformers.LlamaModel(model.config))
    patch(model, backend="torch")
    with pytest.raises(ValueError, match="loss_mask has shape"):
        model(input_ids=ids, labels=labels, loss_mask=torch.ones(3, 9))
    with pytest.raises(ValueError, match="need labels"):
        model(input_ids=ids, loss_mask=torch.ones_like(labels))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    # positional labels are found too (labels is the 6th parameter of LlamaForCausalLM.forward)
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    args = [None] * names.index("labels") + [labels]
    args[0] = ids
    assert model(*args).logits is None


def test_sum_reduction_and_options_pass_through():
    model = make_model("llama")
    ids, am, labels = make_batch()
    ref = model(input_ids=ids, attention_mask=am, labels=labels)
    patch(model, backend="torch", reduction="sum", label_smoothing=0.1)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    targets, _ = shift_for_causal_lm(labels)
    expected = torch.nn.functional.cross_entropy(ref.logits.flatten(0, 1), targets.flatten(),
                                                 reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-4)


def test_probe_refuses_unknown_logit_maps():
    config = CONFIGS["llama"]()

    class Offset(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + torch.linspace(0, 1, out.logits.shape[-1])
            return out

    class HiddenCap(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 5.0 * torch.tanh(out.logits / 5.0)
            return out

    for cls in (Offset, HiddenCap):
        with pytest.raises(NotImplementedError, match="post-processes its logits"):
            patch(cls(config))
        patch(cls(config), verify=False)  # the user takes responsibility

    class Shifted(nn.Module):  # a head that is not F.linear(h, weight)
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, h):
            return torch.nn.functional.linear(h, self.weight) + 1.0

    model = make_model("llama")
    model.lm_head = Shifted(model.lm_head.weight)
    with pytest.raises(NotImplementedError, match="is not F.linear"):
        patch(model)
    # A wrong explicit scale is caught.
    with pytest.raises(NotImplementedError, match="scale=1"):
        patch(make_model("cohere-scale"), logit_scale=1.0)


@pytest.mark.parametrize("arch", ["cohere-scale", "granite-scale", "gemma2-softcap"])
def test_without_the_probe_the_config_gives_the_logit_map(arch):
    model = make_model(arch)
    ids, am, labels = make_batch()
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    patch(model, backend="torch", verify=False)
    assert not model._t3s_patch.head.verified
    out = model(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sliced_vocabulary_padding():
    config = CONFIGS["llama"]()

    class Padded(transformers.LlamaForCausalLM):  # head has 8 padding rows the logits drop
        def __init__(self, config):
            super().__init__(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size + 8, bias=False)

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits[..., : self.config.vocab_size]
            return out

    model = Padded(config).train()
    ids, am, labels = make_batch()
    logits = model(input_ids=ids, attention_mask=am).logits
    targets, _ = shift_for_causal_lm(labels)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    patch(model, backend="torch")
    assert model._t3s_patch.head.vocab_size == V
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


def test_sharded_head_is_refused_clearly():
    model = patch(make_model("llama"), backend="torch")
    ids, am, labels = make_batch()
    model.lm_head.weight = nn.Parameter(torch.empty(0))  # what a ZeRO-3 partition looks like
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        model(input_ids=ids, attention_mask=am, labels=labels)


def test_meta_model_skips_probe_with_warning():
    config = CONFIGS["llama"]()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with pytest.warns(UserWarning, match="not materialised"):
        patch(model)
    assert not model._t3s_patch.head.verified


# Both distributed scripts: 2 gloo ranks, a tiny Llama, its one-process loss and gradients
# on 4 sequences (`ref`, `ref_loss`), and this rank's half of them (`local`).
TWO_RANKS_AND_REFERENCE = """
dist.init_process_group("gloo")
rank = dist.get_rank()
config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)
torch.manual_seed(0)
ref = transformers.LlamaForCausalLM(config).float().train()
ids = torch.randint(0, 101, (4, 8))
ref_loss = ref(input_ids=ids, labels=ids).loss
ref_loss.backward()
local = ids[2 * rank: 2 * rank + 2]
"""

FSDP2_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from t3s.hf import patch
""" + TWO_RANKS_AND_REFERENCE + """
mesh = init_device_mesh("cpu", (2,))

# Head in the root unit: gathered for the root's whole forward; grads match one process.
model = transformers.LlamaForCausalLM(config).float().train()
model.load_state_dict(ref.state_dict())
patch(model, backend="torch")
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
model(input_ids=local, labels=local).loss.backward()
for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
    torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)

def check_layout(make, shard, name):
    # one process vs 2 ranks on half the batch each: the same loss and every gradient
    torch.manual_seed(0)
    ref = make()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = make()
    model.load_state_dict(ref.state_dict())
    patch(model, backend="torch")
    shard(model)
    out = model(input_ids=local, labels=local)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    assert out.logits is None
    torch.testing.assert_close(loss / 2, ref(input_ids=ids, labels=ids).loss.detach(),
                               rtol=1e-5, atol=1e-6, msg=name)
    out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(g, ref_grads[pname].grad, rtol=1e-4, atol=1e-6,
                                   msg=f"{name}: {pname}")


def own_head(model):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def layers_and_root(model):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


llama = lambda: transformers.LlamaForCausalLM(config).float().train()  # noqa: E731
tied_config = transformers.Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=True)
tied = lambda: transformers.Qwen2ForCausalLM(tied_config).float().train()  # noqa: E731
# the head in its own unit: a DTensor when the loss runs, gathered there
check_layout(llama, own_head, "head in its own unit")
# tied input and output embeddings, decoder layers wrapped one by one
check_layout(tied, layers_and_root, "tied embeddings")
def tied_unit(model):  # FSDP2 keeps tied parameters in one group
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh)
    fully_shard(model, mesh=mesh)


check_layout(tied, tied_unit, "tied embeddings and head in their own unit")
print("ok", rank, flush=True)
dist.barrier()
# gloo's worker threads can abort a normal interpreter exit ("terminate called without an
# active exception"); the checks are done, so leave at once
os._exit(0)
"""


FSDP1_SCRIPT = """
import os, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, transformers
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from t3s.hf import patch
""" + TWO_RANKS_AND_REFERENCE + """# decoder layers wrapped (head in the root unit), then every Linear too (head in its own
# unit: its weight is whole only during its call, where the loss is computed)
for units in ({LlamaDecoderLayer}, {LlamaDecoderLayer, torch.nn.Linear}):
    model = transformers.LlamaForCausalLM(config).float().train()
    model.load_state_dict(ref.state_dict())
    patch(model, backend="torch")
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                   auto_wrap_policy=ModuleWrapPolicy(units))
    loss = wrapped(input_ids=local, labels=local).loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / 2, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    with FSDP.summon_full_params(wrapped, with_grads=True):
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
print("ok", rank, flush=True)
dist.barrier()
# gloo's worker threads can abort a normal interpreter exit ("terminate called without an
# active exception"); the checks are done, so leave at once
os._exit(0)
"""


def _torchrun(tmp_path, source, name):
    script = tmp_path / name
    script.write_text(source)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 2


def test_fsdp1_head_in_root_or_own_unit_matches_one_process(tmp_path):
    """FSDP1 (use_orig_params) on 2 gloo processes; the own-unit head gathers its weight
    only inside its call, so t3s computes the loss there."""
    _torchrun(tmp_path, FSDP1_SCRIPT, "fsdp1.py")


def test_fsdp2_layouts_match_one_process(tmp_path):
    """2 gloo processes (torchrun): head in the root unit, in its own unit, tied embeddings
    with layers wrapped one by one: loss and every gradient equal one process."""
    _torchrun(tmp_path, FSDP2_SCRIPT, "fsdp2.py")


# ------------------------------------------------------------------------------------------
# liger-kernel composition
# ------------------------------------------------------------------------------------------


def _fake_liger(monkeypatch, table):
    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    mp = types.ModuleType("liger_kernel.transformers.monkey_patch")
    mp.MODEL_TYPE_TO_APPLY_LIGER_FN = table
    pkg.transformers, sub.monkey_patch = sub, mp
    for name, mod in (("liger_kernel", pkg), ("liger_kernel.transformers", sub),
                      ("liger_kernel.transformers.monkey_patch", mp)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_compose_liger_calls_the_non_loss_patches(monkeypatch):
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                                    model=None):
        calls.append(dict(cross_entropy=cross_entropy, flce=fused_linear_cross_entropy,
                          model=model))

    _fake_liger(monkeypatch, {"llama": apply_liger_kernel_to_llama})
    model = patch(make_model("llama"), compose_liger=True)
    assert calls == [dict(cross_entropy=False, flce=False, model=model)]
    assert model._t3s_patch.liger_applied
    with pytest.warns(UserWarning, match="no kernels for model type 'gpt2'"):
        patch(make_model("gpt2"), compose_liger=True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.delitem(sys.modules, "liger_kernel.transformers")
    monkeypatch.delitem(sys.modules, "liger_kernel.transformers.monkey_patch")
    with pytest.raises(ImportError, match=r"liger extra: pip install 't3s\[liger\]'"):
        patch(make_model("llama"), compose_liger=True)


def test_compose_liger_real_package(monkeypatch):
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # not installed, or does not import on this machine
        pytest.skip(f"liger-kernel unavailable: {exc!r}")
    from transformers.models.llama import modeling_llama

    # Liger rebinds module-level names of the model type for good; put them back afterwards.
    for name, value in list(vars(modeling_llama).items()):
        monkeypatch.setattr(modeling_llama, name, value)
    model = make_model("llama")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        model = model.cuda()
    ids = torch.randint(0, V, (2, 8), device=model.device)
    ref = model(input_ids=ids, labels=ids).loss
    patch(model, compose_liger=True, verify=on_gpu)  # the probe would run liger's kernels
    assert model._t3s_patch.liger_applied
    norm = model.model.norm.forward.__func__.__qualname__
    assert norm.startswith("LigerRMSNorm"), norm
    mlp = model.model.layers[0].mlp
    assert "Liger" in type(mlp).__name__ + mlp.forward.__qualname__
    if on_gpu:  # liger's kernels do not run on CPU tensors
        out = model(input_ids=ids, labels=ids)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Collator and Trainer
# ------------------------------------------------------------------------------------------


def test_padded_collator_feeds_a_patched_model():
    # Rows of different lengths, per-example 0/1 masks (one example has none: all kept), no
    # example ids: the batch goes straight into the patched model. Folding the masks into the
    # labels gives HF's own loss and makes HF's label count the kept-token count.
    features = [{"input_ids": torch.randint(0, V, (n,)), "loss_mask": torch.rand(n) > 0.3}
                for n in (7, 4, 9)]
    del features[1]["loss_mask"]
    batch = PaddedCollator(0)(features)
    folded = PaddedCollator(0, fold_mask_into_labels=True)(features)
    assert torch.equal(folded["loss_mask"], batch["loss_mask"]) and "example_id" not in batch
    model = make_model("llama")
    ref = model(input_ids=folded["input_ids"], attention_mask=folded["attention_mask"],
                labels=folded["labels"])
    patch(model, backend="torch")
    out = model(**batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert count_loss_items(folded["labels"]) == count_loss_items(batch["labels"],
                                                                  batch["loss_mask"])


@pytest.mark.parametrize("fold", [False, True])
def test_trainer_passes_loss_mask_and_num_items(tmp_path, fold):
    pytest.importorskip("accelerate")
    model = patch(make_model("llama"), backend="torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": torch.randint(0, V, (8,)).tolist(), "loss_mask": [0.0] * 8}
            for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       data_collator=PaddedCollator(0, fold_mask_into_labels=fold))
        trainer.train()
    # Every token dropped: zero loss (not 0/0 with num_items_in_batch == 0 when the mask is
    # folded into the labels), zero gradients, and Adam leaves the weights alone.
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
