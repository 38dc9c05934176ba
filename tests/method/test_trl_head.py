"""TRL's fused LM head on t3s's kernels: ``t3s.patch(model)`` then the user's own TRL trainer.

Every comparison is against TRL's own head on an unpatched copy of the same
model (tiny models from configs, CPU, float32): the fields of
``FusedCausalLMOutput``, their gradients under arbitrary per-token upstream
gradients, and plain ``trl.SFTTrainer`` / ``trl.GRPOTrainer`` runs step by step.
"""

import contextlib
import copy
import logging
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import t3s  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0])   # tests/, for tiny.py
from tiny import arithmetic_records, make_tokenizer, tiny_llama  # noqa: E402

V = 67
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama": lambda T: T.LlamaConfig(**COMMON),
    "qwen2-tied": lambda T: T.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda T: T.Qwen3Config(**COMMON, head_dim=8),
    "granite-scale": lambda T: T.GraniteConfig(**COMMON, logits_scaling=8.0),
    "gemma2-softcap": lambda T: T.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.5),
}
ALL_OUTPUTS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")
FIELDS = ALL_OUTPUTS + ("loss", "label_mask")


def make_model(arch, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(
            CONFIGS[arch](transformers), attn_implementation="eager")
    return model.float().train()


def batch(seed, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -3:] = 0  # right padding
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :4] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def with_heads(model, order, **head):
    """``model`` with TRL's head and (order != 'trl') t3s's patch, in the given order."""
    if order == "t3s-then-trl":
        t3s.patch(model)
    add_fused_lm_head(model, **head)
    if order == "trl-then-t3s":
        t3s.patch(model)
    return model


def run(model, inputs, upstream, **call):
    """The fused call, then a backward of sum(upstream[k] * out.k) over the differentiable
    fields; returns (output, parameter gradients)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, fused_lm_head=True, **call)
    total = sum((getattr(out, k) * g).sum() for k, g in upstream.items()) + out.loss
    total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours, ref, grads, ref_grads, fields=FIELDS, atol=2e-5):
    for name in fields:
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=atol, msg=name)


@contextlib.contextmanager
def counting_kernel_calls():
    """Count the fused-head calls that reach t3s's loss kernels (a cheap profiler check)."""
    from t3s.hf import trl_head

    calls = []
    original = trl_head.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    trl_head.linear_cross_entropy = counted
    try:
        yield calls
    finally:
        trl_head.linear_cross_entropy = original


def t3s_op_ran(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return any(n.startswith("t3s_kernels::") for n in names)


# -------------------------------------------------------------------------------------
# The fields and their gradients
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2-tied", "qwen3", "granite-scale"])
@pytest.mark.parametrize("order", ["t3s-then-trl", "trl-then-t3s"])
def test_every_field_and_gradient_equals_trls_head(arch, order):
    base = make_model(arch)
    temperature = 0.7 if order == "t3s-then-trl" else 1.0
    head = dict(outputs=ALL_OUTPUTS, temperature=temperature)
    ref = with_heads(copy.deepcopy(base), "trl", **head)
    ours = with_heads(copy.deepcopy(base), order, **head)
    inputs = batch(1)
    shape = (3, 11)
    upstream = {"log_probs": torch.randn(shape), "entropy": 0.3 * torch.randn(shape)}
    num_items = torch.tensor(17)
    out_ref, g_ref = run(ref, inputs, upstream, num_items_in_batch=num_items)
    out, g = run(ours, inputs, upstream, num_items_in_batch=num_items)
    assert type(out) is type(out_ref)
    assert_same(out, out_ref, g, g_ref)
    # ignored positions hold zeros, as TRL's do
    ignored = ~out.label_mask
    assert ignored.any()
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert (getattr(out, name)[ignored] == 0).all()
    assert t3s_op_ran(lambda: ours(**inputs, fused_lm_head=True))


def test_shift_labels_and_unrequested_fields():
    base = make_model("llama")
    ref = with_heads(copy.deepcopy(base), "trl")  # TRL's default outputs: log_probs only
    ours = with_heads(copy.deepcopy(base), "t3s-then-trl")
    inputs = batch(2)
    labels = inputs.pop("labels")
    shift = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    upstream = {"log_probs": torch.randn(3, 12)}
    out_ref, g_ref = run(ref, inputs, upstream, shift_labels=shift)
    out, g = run(ours, inputs, upstream, shift_labels=shift)
    assert out.log_probs.shape == (3, 12)
    assert out.entropy is None and out.is_top1 is None and out.mean_logits is None
    assert_same(out, out_ref, g, g_ref)


def test_no_trl_forward_uses_trls_defaults_and_all_ignored_is_a_zero():
    """fused_lm_head=True on a patched model that TRL never touched: TRL's defaults. A batch
    whose labels are all -100 gives a differentiable zero, as TRL's does."""
    model = t3s.patch(make_model("llama"))
    inputs = batch(3)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    out = model(**inputs, fused_lm_head=True)
    assert isinstance(out, trl.trainer.utils.FusedCausalLMOutput)
    assert out.loss.item() == 0 and not out.label_mask.any() and out.entropy is None
    out.loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_softcap_with_temperature_falls_back_to_trls_head_once(caplog):
    """Gemma 2's softcap comes before the temperature, which t3s's kernels cannot express:
    TRL's own head runs (said once) and training is not refused."""
    base = make_model("gemma2-softcap")
    head = dict(outputs=("log_probs", "entropy"), temperature=0.7)
    ref = with_heads(copy.deepcopy(base), "trl", **head)
    upstream = {"log_probs": torch.randn(3, 11)}
    out_ref, g_ref = run(ref, batch(4), upstream)
    for order in ("t3s-then-trl", "trl-then-t3s"):
        ours = with_heads(copy.deepcopy(base), order, **head)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="t3s"):
            out, g = run(ours, batch(4), upstream)
            run(ours, batch(4), upstream)
        said = [r for r in caplog.records if "softcap" in r.getMessage()]
        assert len(said) == 1 and "TRL's own head" in said[0].getMessage()
        assert_same(out, out_ref, g, g_ref)
        assert not t3s_op_ran(lambda: ours(**batch(4), fused_lm_head=True))


def test_softcap_at_temperature_one_runs_on_t3s():
    base = make_model("gemma2-softcap")
    head = dict(outputs=("log_probs", "entropy", "is_top1"))
    ref = with_heads(copy.deepcopy(base), "trl", **head)
    ours = with_heads(copy.deepcopy(base), "trl-then-t3s", **head)
    upstream = {"log_probs": torch.randn(3, 11), "entropy": torch.randn(3, 11)}
    out_ref, g_ref = run(ref, batch(5), upstream)
    out, g = run(ours, batch(5), upstream)
    assert_same(out, out_ref, g, g_ref)
    assert t3s_op_ran(lambda: ours(**batch(5), fused_lm_head=True))


def test_bad_calls_are_refused_before_any_work():
    model = with_heads(make_model("llama"), "t3s-then-trl")
    inputs = batch(6)
    with pytest.raises(ValueError, match="loss_mask"):
        model(**inputs, fused_lm_head=True, loss_mask=torch.ones(3, 12))
    labels = inputs.pop("labels")
    with pytest.raises(ValueError, match="need labels"):
        model(**inputs, fused_lm_head=True)
    with pytest.raises(ValueError, match="shape"):
        model(**inputs, labels=labels[:, :5], fused_lm_head=True)


def test_unpatch_restores_trls_own_head():
    base = make_model("llama")
    model = with_heads(copy.deepcopy(base), "trl-then-t3s")
    t3s.unpatch(model)
    assert not t3s_op_ran(lambda: model(**batch(7), fused_lm_head=True))
    assert not model._forward_pre_hooks


# -------------------------------------------------------------------------------------
# Plain trl.SFTTrainer on a patched model against plain TRL
# -------------------------------------------------------------------------------------

TEMPLATE_WITH_GENERATION = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sft_data(kind):
    recs = arithmetic_records(12, seed=3)
    if kind == "messages":
        return datasets.Dataset.from_list([{"messages": [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["response"]}]} for r in recs])
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]}
                                       for r in recs])


def train_sft(tmp_path, model, tok, data, **config):
    config = dict(dict(per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                       optim="sgd", max_grad_norm=0.0, logging_steps=1, report_to=[],
                       save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
                       dataloader_num_workers=0), **config)
    args = trl.SFTConfig(output_dir=str(tmp_path), **config)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def sft_model(arch, tok):
    if arch == "llama":
        return tiny_llama(tok)
    if arch == "llama-tied":
        return tiny_llama(tok, tie_word_embeddings=True)
    torch.manual_seed(0)
    T = transformers
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = T.Qwen2Config(**cfg) if arch == "qwen2" else T.Qwen3Config(**cfg, head_dim=8)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


SFT_CASES = {
    "llama-nll": ("llama", "prompt", {}),
    "llama-dft": ("llama", "prompt", {"loss_type": "dft"}),
    "llama-accumulate2": ("llama", "prompt", {"gradient_accumulation_steps": 2,
                                              "per_device_train_batch_size": 2}),
    "llama-padding-free": ("llama", "prompt", {"padding_free": True, "packing": True}),
    "llama-assistant-only": ("llama", "messages", {"assistant_only_loss": True}),
    "llama-tied": ("llama-tied", "prompt", {}),
    "qwen2": ("qwen2", "prompt", {}),
    "qwen3-dft": ("qwen3", "prompt", {"loss_type": "dft"}),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_plain_sft_trainer_on_a_patched_model_equals_plain_trl(tmp_path, case):
    arch, kind, config = SFT_CASES[case]
    tok = make_tokenizer()
    if kind == "messages":
        tok.chat_template = TEMPLATE_WITH_GENERATION
    data = sft_data(kind)
    base = sft_model(arch, tok)
    ref_logs, ref_params = train_sft(tmp_path / "ref", copy.deepcopy(base), tok, data, **config)
    patched = t3s.patch(copy.deepcopy(base))
    result = []
    if case == "llama-nll":  # the kernels' own ops in the profiler trace (costs seconds)
        assert t3s_op_ran(lambda: result.append(
            train_sft(tmp_path / "t3s", patched, tok, data, **config)))
    else:
        with counting_kernel_calls() as calls:
            result.append(train_sft(tmp_path / "t3s", patched, tok, data, **config))
        assert calls
    logs, params = result[0]
    assert len(logs) == len(ref_logs) == 3
    for ours, ref in zip(logs, ref_logs):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    moved = any(not torch.equal(ref_params[n], p) for n, p in base.named_parameters())
    assert moved
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------
# Plain trl.GRPOTrainer
# -------------------------------------------------------------------------------------


def length_reward(completions, **kwargs):
    return [float(c.count("1")) + 0.1 * len(c) for c in completions]


def train_grpo(tmp_path, model, tok, patch_ref=False, **config):
    recs = arithmetic_records(8, seed=0)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in recs])
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=6, max_steps=2,
                          learning_rate=0.5, optim="sgd", max_grad_norm=0.0, logging_steps=1,
                          report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                          disable_tqdm=True, seed=0, **config)
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                              reward_funcs=length_reward)
    if patch_ref:  # TRL loads the reference model itself (by name) and installs its head
        t3s.patch(trainer.ref_model)
    seen = []
    compute = trainer._get_per_token_logps_and_entropies

    def recording(*args, **kwargs):
        out = compute(*args, **kwargs)
        seen.append((out[0].detach().clone(), None if out[1] is None else out[1].detach().clone()))
        return out

    trainer._get_per_token_logps_and_entropies = recording
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, seen, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_plain_grpo_trainer_log_probs_equal_trls(tmp_path, beta):
    """GRPO samples completions, scores them with the policy through the fused head, and
    trains on per-token log-probs weighted by advantages: every log-prob, entropy and
    update equals plain TRL's. With beta > 0 TRL loads a reference model by name; patched
    too, it scores the KL term's log-probs on t3s's kernels as well."""
    tok = make_tokenizer()
    theta0 = tmp_path / "theta0"
    tiny_llama(tok).save_pretrained(theta0)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(theta0).train()  # noqa: E731
    ref = train_grpo(tmp_path / "ref", load(), tok, beta=beta)
    result = []
    patched = t3s.patch(load())
    with counting_kernel_calls() as calls:
        result.append(train_grpo(tmp_path / "t3s", patched, tok, patch_ref=beta > 0,
                                 beta=beta))
    # per step (2): the policy's forward, and with beta > 0 the reference model's
    assert len(calls) == (4 if beta > 0 else 2)
    (logs, seen, params), (ref_logs, ref_seen, ref_params) = result[0], ref
    assert len(seen) == len(ref_seen) >= 2
    for (logps, ent), (ref_logps, ref_ent) in zip(seen, ref_seen):
        torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=2e-6)
        if ref_ent is not None:
            torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-6)
    for ours, theirs in zip(logs, ref_logs):
        for key in ("loss", "entropy", "reward"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------
# T3S's selection in plain TRL, and recording from TRL's head
# -------------------------------------------------------------------------------------


def selection(tok, n=12):
    """A TraceDataset and an anchor-rule artifact over it from random confidences."""
    import numpy as np

    rng = np.random.default_rng(0)
    recs = arithmetic_records(n, seed=7)
    ds = t3s.TraceDataset.from_jsonl(recs, tok)
    keys = ds.keys()
    c0 = keys.with_columns(c=-rng.exponential(size=len(keys)))
    cb = keys.with_columns(c=-rng.exponential(size=len(keys)))
    delta = t3s.confidence_change(c0, cb)
    art = t3s.SelectionArtifact.create(delta, examples=ds, tokenizer=tok, rule="anchor",
                                       selector="tiny", theta0="0", thetab="1")
    return ds, art


STEP_ARGS = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=0.5, optim="sgd",
                 max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no",
                 use_cpu=True, bf16=False, disable_tqdm=True, seed=0, dataloader_num_workers=0)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_selection_as_labels_in_plain_sft_equals_t3s_sft_trainer(tmp_path):
    """trl_dataset folds the artifact's dropped tokens into -100 labels: a plain SFTTrainer on
    a patched model then trains exactly what T3SSFTTrainer trains with the loss masks."""
    from t3s.trainer import T3SSFTTrainer, trl_dataset

    tok = make_tokenizer()
    ds, art = selection(tok)
    masks = art.loss_masks(ds)
    dropped = sum(int((~m & (torch.as_tensor(ex["labels"]) != -100)).sum())
                  for ex, m in zip(ds, (masks[int(e["example_id"])] for e in ds)))
    assert dropped > 0
    base = tiny_llama(tok)
    plain = trl.SFTTrainer(model=t3s.patch(copy.deepcopy(base)),
                           args=trl.SFTConfig(output_dir=str(tmp_path / "plain"), **STEP_ARGS),
                           train_dataset=trl_dataset(ds, art, tokenizer=tok),
                           processing_class=tok)
    plain.train()
    ours = T3SSFTTrainer(model=copy.deepcopy(base),
                         args=trl.SFTConfig(output_dir=str(tmp_path / "t3s"), **STEP_ARGS),
                         train_dataset=ds, processing_class=tok,
                         data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
    ours.train()
    a = [r for r in plain.state.log_history if "loss" in r]
    b = [r for r in ours.state.log_history if "loss" in r]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        # TRL's metric names, from both routes
        for key in ("entropy", "mean_token_accuracy", "num_tokens"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    for (name, p), q in zip(plain.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_trl_dataset_refuses_what_labels_cannot_carry():
    from t3s.trainer import trl_dataset

    tok = make_tokenizer()
    ds, art = selection(tok, n=4)
    ex = ds[0]
    weights = {int(e["example_id"]): torch.full((len(e["labels"]),), 0.5) for e in ds}
    with pytest.raises(ValueError, match="T3SSFTTrainer"):
        trl_dataset(ds, weights)
    short = {int(e["example_id"]): torch.ones(3, dtype=torch.bool) for e in ds}
    with pytest.raises(ValueError, match="shape"):
        trl_dataset(ds, short)
    with pytest.raises(ValueError, match="no mask for example_id"):
        trl_dataset(ds, {int(ex["example_id"]): torch.ones(len(ex["labels"]), dtype=torch.bool)})
    other = make_tokenizer(chars=list("abcdefghijklmnopqrstuvwxyz0123456789+=;# \n:.{}\\!"))
    with pytest.raises(ValueError, match="tokenizer"):
        trl_dataset(ds, art, tokenizer=other)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_trajectory_callback_records_from_trls_head(tmp_path):
    """TrajectoryCallback in a plain SFTTrainer records the per-token log-probs of TRL's
    fused outputs (no extra forward): the same store as T3SSFTTrainer's own recording."""
    from t3s.trainer import T3SSFTTrainer, trl_dataset

    tok = make_tokenizer()
    ds, art = selection(tok)
    masks = art.loss_masks(ds)
    base = tiny_llama(tok)
    args = dict(STEP_ARGS, remove_unused_columns=False)
    plain = trl.SFTTrainer(
        model=t3s.patch(copy.deepcopy(base)),
        args=trl.SFTConfig(output_dir=str(tmp_path / "plain"), **args),
        train_dataset=trl_dataset(ds, art), processing_class=tok,
        data_collator=t3s.PaddedCollator(tok.pad_token_id),
        callbacks=[t3s.TrajectoryCallback(tmp_path / "plain-traj", extra_columns=("entropy",),
                                          dataset_fingerprint="fp")])
    plain.train()
    ours = T3SSFTTrainer(model=copy.deepcopy(base),
                         args=trl.SFTConfig(output_dir=str(tmp_path / "t3s"), **STEP_ARGS),
                         train_dataset=ds, processing_class=tok,
                         data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks),
                         trajectory_dir=tmp_path / "t3s-traj",
                         trajectory_options=dict(extra_columns=("entropy",),
                                                 dataset_fingerprint="fp"))
    ours.train()
    tables = [t3s.TrajectoryReader(tmp_path / d, dataset_fingerprint="fp").read()
              for d in ("plain-traj", "t3s-traj")]
    key = ["step", "example_id", "position"]
    frames = [t.to_pandas().sort_values(key).reset_index(drop=True) for t in tables]
    assert len(frames[0]) == len(frames[1]) > 0
    assert (frames[0][key].values == frames[1][key].values).all()
    for column in ("logprob", "entropy"):
        torch.testing.assert_close(torch.tensor(frames[0][column].values),
                                   torch.tensor(frames[1][column].values),
                                   rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------
# Sharded heads: ZeRO-3 (weight whole only inside the head's call) and FSDP2 (DTensor)
# -------------------------------------------------------------------------------------


def test_zero3_tagged_head_is_served_inside_its_call():
    """A head weight tagged as a ZeRO-3 partition (``ds_id``) is whole only during the head's
    own call: TRL's fields are computed there, and the head's output leads to log_probs so
    that the engine's backward hooks re-gather the weight before t3s's backward."""
    base = make_model("llama")
    ref = with_heads(copy.deepcopy(base), "trl", outputs=("log_probs", "entropy"))
    ours = with_heads(copy.deepcopy(base), "t3s-then-trl", outputs=("log_probs", "entropy"))
    head = ours.lm_head
    head.weight.ds_id = 0
    events = []
    head.register_forward_pre_hook(lambda module, args: events.append("call"))

    def returned(module, args, output):
        events.append("return")
        output.register_hook(lambda grad: events.append("backward"))

    head.register_forward_hook(returned)
    upstream = {"log_probs": torch.randn(3, 11)}
    out_ref, g_ref = run(ref, batch(8), upstream)
    out, g = run(ours, batch(8), upstream)
    assert events == ["call", "return", "backward"]
    assert_same(out, out_ref, g, g_ref)


def _fsdp2_worker(rank, port, seed, errors):
    import os
    import traceback

    try:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.manual_seed(seed)
        base = make_model("llama", seed=seed)
        inputs = batch(seed + 1)
        upstream = {"log_probs": torch.randn(3, 11), "entropy": torch.randn(3, 11)}
        ref = with_heads(copy.deepcopy(base), "trl", outputs=("log_probs", "entropy"))
        out_ref, g_ref = run(ref, inputs, upstream)
        model = with_heads(copy.deepcopy(base), "t3s-then-trl", outputs=("log_probs", "entropy"))
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)  # its own unit: still a DTensor when the fields are computed
        fully_shard(model)
        out, grads = run(model, inputs, upstream)
        grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
        # both ranks ran the same batch: FSDP2 averaged identical gradients
        assert_same(out, out_ref, grads, g_ref, atol=5e-5)
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    os._exit(0)  # gloo's threads can abort a normal interpreter exit


def test_fsdp2_dtensor_head_equals_one_process():
    from two_ranks import run_two_ranks

    seed = int(torch.randint(0, 2**31 - 1, ()))
    run_two_ranks(_fsdp2_worker, seed, what=f"seed {seed}")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_t3s_sft_trainer_dft_runs_token_scaling_in_the_kernel(tmp_path):
    """T3SSFTTrainer(loss_type='dft') trains with the kernels' token_scaling (one pass), and
    equals plain TRL's dft on an unpatched model step by step."""
    from t3s.trainer import T3SSFTTrainer, trl_dataset

    tok = make_tokenizer()
    ds, _ = selection(tok)
    base = tiny_llama(tok)
    args = dict(STEP_ARGS, loss_type="dft")
    plain = trl.SFTTrainer(model=copy.deepcopy(base),
                           args=trl.SFTConfig(output_dir=str(tmp_path / "plain"), **args),
                           train_dataset=trl_dataset(ds), processing_class=tok)
    plain.train()
    import t3s.loss as t3s_loss

    calls = []
    original = t3s_loss.linear_cross_entropy

    def spy(*a, **kw):
        calls.append(kw.get("token_scaling"))
        return original(*a, **kw)

    ours = T3SSFTTrainer(model=copy.deepcopy(base),
                         args=trl.SFTConfig(output_dir=str(tmp_path / "t3s"), **args),
                         train_dataset=ds, processing_class=tok)
    t3s_loss.linear_cross_entropy = spy
    try:
        ours.train()
    finally:
        t3s_loss.linear_cross_entropy = original
    assert calls and all(c is True for c in calls)
    a = [r for r in plain.state.log_history if "loss" in r]
    b = [r for r in ours.state.log_history if "loss" in r]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    for (name, p), q in zip(plain.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_wrapper_that_runs_the_backbone_itself_is_still_refused():
    """Only TRL's head is served; any other forward installed after t3s.patch that runs the
    backbone itself (and would drop loss_mask) stops at its first training forward."""
    model = t3s.patch(make_model("llama"))

    def bypass(input_ids=None, attention_mask=None, labels=None, **kwargs):
        return model.model(input_ids=input_ids, attention_mask=attention_mask)

    model.forward = bypass
    with pytest.raises(RuntimeError, match="bypassed.*bypass"):
        model(**batch(9))


def test_calls_past_the_hooks():
    """A wrapper that calls ``model.forward`` directly skips the model's hooks. With t3s's
    forward outermost (patched after TRL) the call is still served by t3s; with TRL's
    outermost it reaches TRL's head, and the first training forward stops with the
    bypass error instead of training on TRL's head unseen."""
    base = make_model("llama")
    ref = with_heads(copy.deepcopy(base), "trl", outputs=("log_probs", "entropy"))
    upstream = {"log_probs": torch.randn(3, 11)}
    out_ref, g_ref = run(ref, batch(10), upstream)
    ours = with_heads(copy.deepcopy(base), "trl-then-t3s", outputs=("log_probs", "entropy"))
    with counting_kernel_calls() as calls:
        ours.zero_grad(set_to_none=True)
        out = ours.forward(**batch(10), fused_lm_head=True)
        ((out.log_probs * upstream["log_probs"]).sum() + out.loss).backward()
    assert calls
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    assert_same(out, out_ref, grads, g_ref, fields=("log_probs", "entropy", "loss"))
    outer_trl = with_heads(copy.deepcopy(base), "t3s-then-trl")
    with pytest.raises(RuntimeError, match="bypassed.*TRL's fused LM head"):
        outer_trl.forward(**batch(10), fused_lm_head=True)


def test_unreadable_trl_settings_leave_the_call_to_trls_head(monkeypatch, caplog):
    """Another TRL version whose head keeps its settings elsewhere: t3s cannot know the
    temperature or the requested fields, says so once, and TRL's own head serves."""
    from t3s.hf import trl_head

    base = make_model("llama")
    ref = with_heads(copy.deepcopy(base), "trl", outputs=("log_probs", "entropy"))
    ours = with_heads(copy.deepcopy(base), "trl-then-t3s", outputs=("log_probs", "entropy"))

    def _fused_forward(self, *args, **kwargs):  # no closure: nothing to read
        raise AssertionError("never called")

    monkeypatch.setattr(trl_head, "trl_forward", lambda model: _fused_forward)
    upstream = {"log_probs": torch.randn(3, 11)}
    out_ref, g_ref = run(ref, batch(11), upstream)
    with caplog.at_level(logging.WARNING, logger="t3s"):
        with counting_kernel_calls() as calls:
            out, g = run(ours, batch(11), upstream)
            run(ours, batch(11), upstream)
    assert not calls
    said = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(said) == 1
    assert_same(out, out_ref, g, g_ref)
