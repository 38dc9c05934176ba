"""Packed (padding-free) batches equal padded ones: loss, gradients, target log-probs, the
profile and a recorded trajectory, on tiny Llama, Qwen2, Qwen3 and GPT-2 configs (random
weights, vocabulary 64) with sdpa and eager attention; the collator keeps example ids and
loss masks, empty and length-1 examples included; a model whose attention ignores the
packed positions is found by the probe (`t3s.hf.packing.packing_support`) and padded.
"""

import copy
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny import arithmetic_records, jsonl_lines, make_tokenizer  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, TrainingArguments)

import t3s  # noqa: E402
from t3s.data import PackedCollator, PaddedCollator, packed_keys, token_keys  # noqa: E402
from t3s.hf.packing import packing_support  # noqa: E402
from t3s.trainer import T3STrainer  # noqa: E402
from t3s.trajectory import TrajectoryReader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

V = 64
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                               n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                               attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
}


def make_model(arch: str, attn: str, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHS[arch]()
    model.config._attn_implementation = attn
    return model.train()


def examples(rng, lengths=(7, 1, 12, 5, 9)):
    """Random examples (ids 3..V-1, the first quarter a prompt), ids 10, 11, ..."""
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, V, n)
        labels = ids.copy()
        labels[: n // 4] = -100
        out.append({"example_id": 10 + i, "input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def weights(exs, rng):
    return {e["example_id"]: torch.tensor(rng.random(len(e["input_ids"])), dtype=torch.float32)
            for e in exs}


def run(model, batch):
    """(loss, {param: grad}, {(example_id, position): target log-prob}) of one batch."""
    batch = dict(batch)
    eids = batch.pop("example_id")
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_token_stats=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rows, cols, eid, pos = token_keys(batch["labels"], eids,
                                      position_ids=batch.get("position_ids")
                                      if "attention_mask" not in batch else None,
                                      attention_mask=batch.get("attention_mask"))
    lp = out.token_stats.target_logprob.detach()[rows, cols].numpy()
    return float(out.loss.detach()), grads, dict(zip(zip(eid.tolist(), pos.tolist()), lp.tolist()))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_equals_padded(arch, attn):
    rng = np.random.default_rng(0)
    exs = examples(rng)
    masks = weights(exs, rng)
    model = t3s.patch(make_model(arch, attn))
    assert packing_support(model) == (True, "")
    loss_a, grad_a, lp_a = run(model, PaddedCollator(0, loss_masks=masks)(exs))
    loss_b, grad_b, lp_b = run(model, PackedCollator(loss_masks=masks)(exs))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert set(grad_a) == set(grad_b)
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-6)
    assert set(lp_a) == set(lp_b) and len(lp_a) > 10
    np.testing.assert_allclose([lp_b[k] for k in lp_a], list(lp_a.values()), rtol=1e-5, atol=1e-5)
    # the profiling pass (forward only, its own batching): the same rows either way
    ta = t3s.profile(model, exs, batch_size=3, progress=False)
    tb = t3s.profile(model, exs, batch_size=3, progress=False, packing=True)
    for col in ("example_id", "position"):
        assert ta[col].to_pylist() == tb[col].to_pylist()
    np.testing.assert_allclose(tb["logprob"].to_numpy(), ta["logprob"].to_numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_recorded_trajectory_is_the_padded_ones(arch, tmp_path):
    """Two optimizer steps of T3STrainer with a trajectory store: the same rows and
    log-probs (and so the same Δc) with either collator."""
    tok = make_tokenizer()
    ds = t3s.TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(6, seed=1)), tok)
    rng = np.random.default_rng(1)
    masks = {ex["example_id"]: torch.tensor(rng.random(len(ex["labels"])) < 0.7)
             for ex in ds}
    base = make_model(arch, "sdpa", seed=3)
    tables = {}
    for name, collator in (("padded", PaddedCollator(tok.pad_token_id, loss_masks=masks)),
                           ("packed", PackedCollator(loss_masks=masks))):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=3,
                                 max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0)
        T3STrainer(model=copy.deepcopy(base), args=args, train_dataset=ds, processing_class=tok,
                   data_collator=collator, trajectory_dir=str(tmp_path / name / "traj")).train()
        tables[name] = TrajectoryReader(tmp_path / name / "traj",
                                        dataset_fingerprint=t3s.dataset_fingerprint(ds)).read().sort_by(
            [("step", "ascending"), ("example_id", "ascending"), ("position", "ascending")])
    a, b = tables["padded"], tables["packed"]
    assert a.num_rows == b.num_rows > 0
    for col in ("step", "example_id", "position"):
        assert a[col].to_pylist() == b[col].to_pylist()
    np.testing.assert_allclose(b["logprob"].to_numpy(), a["logprob"].to_numpy(),
                               rtol=1e-4, atol=1e-4)


def test_empty_and_length_one_examples_keep_ids_and_masks():
    exs = [{"example_id": 5, "input_ids": [4, 5, 6], "labels": [-100, 5, 6]},
           {"example_id": 6, "input_ids": [], "labels": []},
           {"example_id": 7, "input_ids": [9]},                      # labels default to ids
           {"example_id": 8, "input_ids": [7, 8], "labels": [7, 8]}]
    masks = {5: torch.tensor([0.0, 0.5, 1.0]), 6: torch.zeros(0), 7: torch.tensor([1.0]),
             8: torch.tensor([1.0, 0.25])}
    batch = PackedCollator(loss_masks=masks)(exs)
    assert batch["example_id"].tolist() == [5, 7, 8]   # the empty one has no start to key
    assert batch["input_ids"].tolist() == [[4, 5, 6, 9, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100, 8]]
    # each example's mask in its place, 0 at every sequence start
    assert batch["loss_mask"].tolist() == [[0.0, 0.5, 1.0, 0.0, 0.0, 0.25]]
    eid, pos = packed_keys(batch)
    assert eid.tolist() == [5, 5, 5, 7, 8, 8] and pos.tolist() == [0, 1, 2, 0, 0, 1]
    _, _, teid, tpos = token_keys(batch["labels"], batch["example_id"],
                                  position_ids=batch["position_ids"])
    assert list(zip(teid.tolist(), tpos.tolist())) == [(5, 1), (5, 2), (8, 1)]
    # the padded batch keys the same targets
    padded = PaddedCollator(0, loss_masks=masks)(exs)
    _, _, peid, ppos = token_keys(padded["labels"], padded["example_id"],
                                  attention_mask=padded["attention_mask"])
    assert list(zip(peid.tolist(), ppos.tolist())) == [(5, 1), (5, 2), (8, 1)]
    flash = PackedCollator(return_flash_attn_kwargs=True)(exs)
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and flash["max_length_q"] == 3
    with pytest.raises(ValueError, match="every example of the batch is empty"):
        PackedCollator()([exs[1]])


def test_profile_packs_length_one_and_empty_examples():
    rng = np.random.default_rng(2)
    exs = examples(rng, lengths=(6, 1, 0, 4))
    model = make_model("llama", "sdpa")
    ta = t3s.profile(model, exs, batch_size=4, progress=False)
    tb = t3s.profile(model, exs, batch_size=4, progress=False, packing=True)
    assert ta["example_id"].to_pylist() == tb["example_id"].to_pylist()
    assert set(tb["example_id"].to_pylist()) == {10, 13}
    np.testing.assert_allclose(tb["logprob"].to_numpy(), ta["logprob"].to_numpy(), atol=1e-5)


class _IgnoresPositions(LlamaForCausalLM):
    """A model on its own code whose forward drops position_ids: packed sequences would
    attend to each other."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_cannot_pack_is_found_and_padded(caplog):
    from t3s.pipeline import batching
    model = _IgnoresPositions(LlamaConfig(**_COMMON))
    ok, why = packing_support(model)
    assert not ok and "attend to each other" in why
    cfg = {"packing": "on", "attn_implementation": "auto"}
    batching._SAID.clear()
    with caplog.at_level(logging.WARNING):
        assert batching.train_collator(model, cfg, 0).__class__ is PaddedCollator
        assert batching.train_collator(model, cfg, 0).__class__ is PaddedCollator
    said = [r for r in caplog.records if "padding its batches instead" in r.getMessage()]
    assert len(said) == 1   # once, not once per stage
    good = make_model("llama", "sdpa")
    assert isinstance(batching.train_collator(good, cfg, 0), PackedCollator)
    # auto packs under flash attention only; off never packs
    assert isinstance(batching.train_collator(good, {"packing": "auto"}, 0), PaddedCollator)
    assert isinstance(batching.train_collator(good, {"packing": "off"}, 0), PaddedCollator)
    good.config._attn_implementation = "flash_attention_2"   # not run: only the choice
    flash = batching.train_collator(good, {"packing": "auto"}, 0)
    assert isinstance(flash, PackedCollator) and flash.return_flash_attn_kwargs
