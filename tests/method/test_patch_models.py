"""Which models `t3s.patch` takes: causal LMs of any architecture, and nothing else."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import t3s  # noqa: E402

SMALL = dict(vocab_size=53, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=32)


@pytest.mark.parametrize("make", [
    lambda: transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)),
    lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=53, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)),
], ids=["masked-lm", "encoder-decoder"])
def test_non_causal_models_are_refused(make):
    model = make()
    forward = model.forward
    with pytest.raises(ValueError, match="causal"):
        t3s.patch(model)
    assert not t3s.is_patched(model)
    assert model.forward == forward  # nothing was installed


def test_subclasses_and_lm_head_models_are_causal():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    llama = MyLlama(transformers.LlamaConfig(**SMALL, num_key_value_heads=1))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=53, n_embd=16,
                                                                n_layer=1, n_head=2))
    for model in (llama, gpt2):
        t3s.patch(model, backend="torch")
        ids = torch.randint(0, 53, (2, 5))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        t3s.unpatch(model)


def test_plain_trl_sft_trainer_on_a_patched_model_trains_on_t3s(tmp_path):
    """TRL's SFTTrainer installs its fused LM head over t3s's forward; the head's calls run
    on t3s's kernels (tests/method/test_trl_head.py compares them with TRL's own). Afterwards
    t3s.unpatch refuses (TRL's forward is the outer one) and generation still works."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import sys
    sys.path.insert(0, __file__.rsplit("/", 2)[0])   # tests/, for tiny.py
    from tiny import arithmetic_records, make_tokenizer, tiny_llama

    tok = make_tokenizer()
    model = t3s.patch(tiny_llama(tok), backend="torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = [{"prompt": r["prompt"], "completion": r["response"]}
               for r in arithmetic_records(6, seed=5)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                         report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(records))
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="replaced after t3s.patch, by TRL's fused LM head"):
        t3s.unpatch(model)
    model.eval()
    model.generate(torch.tensor([[1, 10, 11]]), max_new_tokens=2, do_sample=False)
