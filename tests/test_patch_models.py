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
