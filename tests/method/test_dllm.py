"""t3s.dllm: the masked-diffusion loss against float64 references, forced masking, the AR
selector's artifact, the adapters, generation and the trainer."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS
from tiny import (MASK, SPECIAL, arithmetic_records, diffusion_tokenizer, make_tokenizer,
                  tiny_bert, tiny_llama)

import t3s
from t3s import dllm
from t3s.dllm.masking import Corruption


def batch(B=3, L=13, V=40, prompt=4, seed=None):
    ids = torch.randint(8, V, (B, L))
    response = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        response[b, prompt + b: L - b] = True        # different response lengths, padding at the end
    return ids, response


def reference_loss(logits, targets, corruption, forced_weight="inv_t"):
    """LLaDA's SFT loss in float64 from full logits: (1/B) Σ_b (1/L_b) Σ_masked w·CE."""
    c = corruption
    ce = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="none")
    ce = ce.view(targets.shape)
    B = targets.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        Lb = int(c.response[b].sum())
        for i in range(targets.shape[1]):
            if not c.masked[b, i]:
                continue
            scale = 1.0 if (forced_weight == "unit" and c.forced[b, i]) else 1.0 / float(c.t[b])
            total = total + ce[b, i] * scale / Lb
    return total / B


# -- the loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("forced_weight", dllm.FORCED_WEIGHTS)
def test_loss_and_gradients_equal_float64_reference(backend, dtype, forced_weight):
    B, L, H, V = 3, 13, 24, 37
    ids, response = batch(B, L, V)
    forced = response & (torch.rand(B, L) < 0.3)
    t = torch.tensor([0.15, 0.6, 0.93])
    c = dllm.corrupt(ids, response, V - 1, forced=forced, t=t)
    w = dllm.diffusion_token_weights(c, forced_weight=forced_weight)
    hidden = torch.randn(B, L, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.5
    bias = torch.randn(V, dtype=torch.float64)
    leaves = [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)]
    loss = dllm.masked_diffusion_loss(leaves[0], leaves[1], ids, w, bias=leaves[2], backend=backend)
    loss.backward()
    ref_leaves = [x.detach().clone().to(dtype).double().requires_grad_() for x in (hidden, weight, bias)]
    ref = reference_loss(F.linear(*ref_leaves), ids, c, forced_weight)
    ref.backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol * 5, atol=tol * 5)


def test_weights_are_inverse_t_normalised_per_response_length_and_batch():
    ids, response = batch(B=3, L=12)
    forced = torch.zeros_like(response)
    forced[0, 5] = True
    t = torch.tensor([0.25, 0.5, 1.0])
    c = dllm.corrupt(ids, response, 3, forced=forced, t=t)
    lengths = response.sum(1).double()
    for fw in dllm.FORCED_WEIGHTS:
        w = dllm.diffusion_token_weights(c, forced_weight=fw).double()
        assert bool((w[~c.masked] == 0).all())
        for b in range(3):
            for i in torch.nonzero(c.masked[b]).flatten().tolist():
                unit = fw == "unit" and bool(c.forced[b, i])
                want = (1.0 if unit else 1.0 / float(t[b])) / (float(lengths[b]) * 3)
                assert abs(float(w[b, i]) - want) < 1e-7
    # t = 1 masks every response token: each sequence's weights then sum to 1/B
    full = dllm.corrupt(ids, response, 3, t=torch.ones(3))
    assert bool((full.masked == response).all())
    sums = dllm.diffusion_token_weights(full).double().sum(1)
    torch.testing.assert_close(sums, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_random_masking_rate_follows_t():
    ids = torch.randint(8, 40, (4, 2000))
    response = torch.ones_like(ids, dtype=torch.bool)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    c = dllm.corrupt(ids, response, 5, t=t)
    rate = c.masked.double().mean(1)
    assert bool(((rate - t.double()).abs() < 0.05).all()), rate
    drawn = dllm.sample_noise_levels(5000, eps=0.2)
    assert float(drawn.min()) >= 0.2 and float(drawn.max()) <= 1.0
    assert abs(float(drawn.mean()) - 0.6) < 0.02


def test_model_loss_equals_float64_reference_through_the_model():
    """diffusion_sft_loss on a tiny BERT = the float64 loss of the model's own logits."""
    tok = diffusion_tokenizer()
    model = tiny_bert(tok).double()
    adapter = dllm.MaskedLMAdapter(model, tokenizer=tok)
    ids, response = batch(B=3, L=11, V=len(tok) - 1)
    ids[ids == adapter.mask_token_id] = 9
    forced = response & (torch.rand(3, 11) < 0.25)
    t = torch.tensor([0.3, 0.55, 0.8])
    g = torch.Generator().manual_seed(7)
    out = dllm.diffusion_sft_loss(adapter, ids, response, forced=forced, t=t, generator=g)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    c = out.corruption
    assert bool((c.noisy_ids[c.masked] == adapter.mask_token_id).all())
    assert bool((c.noisy_ids[~c.masked] == ids[~c.masked]).all())
    logits = model(input_ids=c.noisy_ids, attention_mask=torch.ones_like(ids)).logits
    ref = reference_loss(logits, ids, c)
    ref.backward()
    # float64 model; the 1/(t·L_b·B) weights are float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-9)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8)
    assert out.metrics["forced_fraction"] == pytest.approx(float(forced.sum()) / float(response.sum()))


# -- forced masking --------------------------------------------------------------------------

def test_forced_tokens_are_always_masked_and_never_outside_the_response():
    ids, response = batch(B=4, L=30)
    forced = response & (torch.rand(4, 30) < 0.2)
    forced[0, response[0].nonzero()[0]] = True
    for _ in range(20):
        c = dllm.corrupt(ids, response, 3, forced=forced, eps=1e-3)
        assert bool(c.masked[forced].all())
        assert not bool(c.masked[~response].any())
        assert bool((c.noisy_ids[~response] == ids[~response]).all())
    # tiny t: the random draw masks (almost) nothing, forced still all masked
    c = dllm.corrupt(ids, response, 3, forced=forced, t=torch.full((4,), 1e-6))
    assert bool((c.masked == forced).all())
    assert c.forced_fraction == pytest.approx(float(forced.sum()) / float(response.sum()))
    bad = forced.clone()
    bad[1, 0] = True          # a prompt position
    with pytest.raises(ValueError, match="outside the response"):
        dllm.corrupt(ids, response, 3, forced=bad)


@pytest.mark.parametrize("make,err,match", [
    (lambda ids, r: dict(input_ids=ids[0], response=r[0]), ValueError, r"\[B, L\]"),
    (lambda ids, r: dict(input_ids=ids.float(), response=r), TypeError, "int64"),
    (lambda ids, r: dict(input_ids=ids, response=r[:, :-1]), ValueError, "shape"),
    (lambda ids, r: dict(input_ids=ids, response=r.float()), TypeError, "bool"),
    (lambda ids, r: dict(input_ids=ids, response=r.long() * 2), ValueError, "0 and 1"),
    (lambda ids, r: dict(input_ids=ids, response=r, t=torch.tensor([0.5, 0.0, 0.5])), ValueError, r"\(0, 1\]"),
    (lambda ids, r: dict(input_ids=ids, response=r, t=torch.tensor([0.5, float("nan"), 0.5])),
     ValueError, r"\(0, 1\]"),
    (lambda ids, r: dict(input_ids=ids, response=r, t=torch.tensor([0.5, 0.5])), ValueError, r"\[B\]"),
    (lambda ids, r: dict(input_ids=ids, response=r, mask_token_id=-1), ValueError, "mask_token_id"),
    (lambda ids, r: dict(input_ids=ids[:, :0], response=r[:, :0]), ValueError, "empty"),
])
def test_corrupt_refuses_bad_inputs(make, err, match):
    ids, response = batch(B=3, L=10)
    kw = {"mask_token_id": 3, **make(ids, response)}
    with pytest.raises(err, match=match):
        dllm.corrupt(kw.pop("input_ids"), kw.pop("response"), kw.pop("mask_token_id"), **kw)


def test_loss_refuses_a_batch_without_response_and_bad_weights():
    ids, response = batch(B=2, L=8)
    c = dllm.corrupt(ids, torch.zeros_like(response), 3)
    with pytest.raises(ValueError, match="no response token"):
        dllm.diffusion_token_weights(c)
    with pytest.raises(ValueError, match="forced_weight"):
        dllm.diffusion_token_weights(dllm.corrupt(ids, response, 3), forced_weight="half")
    w = torch.full((2, 8), float("nan"))
    with pytest.raises(ValueError, match="finite"):
        dllm.masked_diffusion_loss(torch.randn(2, 8, 4), torch.randn(40, 4), ids, w)
    with pytest.raises(TypeError, match="float"):
        dllm.masked_diffusion_loss(torch.randn(2, 8, 4), torch.randn(40, 4), ids, response)
    with pytest.raises(ValueError):   # label out of range, checked by the kernel's validation
        dllm.masked_diffusion_loss(torch.randn(2, 8, 4), torch.randn(10, 4), ids,
                                   torch.ones(2, 8))


# -- the AR selector's artifact -------------------------------------------------------------

def _artifact(tok, records, rule="forced", tau=0.2, seed=0):
    data = t3s.TraceDataset.from_records(t3s.read_traces(records), tok)
    keys = data.keys()
    rng = np.random.default_rng(seed)
    delta = rng.normal(0, 0.3, len(keys)).astype(np.float32)
    table = keys.with_columns(delta=delta)
    params = {"tau": tau} if rule == "forced" else {}
    return data, t3s.SelectionArtifact.create(table, examples=data, tokenizer=tok, rule=rule,
                                              params=params), delta, keys


def test_forced_masks_from_an_ar_artifact(tmp_path):
    tok = diffusion_tokenizer()
    data, art, delta, keys = _artifact(tok, arithmetic_records(12))
    path = tmp_path / "selection.parquet"
    art.save(path)
    masks = dllm.forced_masks(path, data, tok)
    n_forced = sum(int(m.sum()) for m in masks.values())
    assert n_forced == int((delta < -0.2).sum()) > 0
    for ex in data:
        m = masks[int(ex["example_id"])]
        assert m.dtype == torch.bool and m.shape == ex["labels"].shape
        assert not bool(m[ex["labels"] == -100].any())     # never outside the response
    assert dllm.forced_fraction_of(masks, data) == pytest.approx(n_forced / len(keys))
    # another rule's artifact: the forced set is re-derived from its Δc with τ
    _, anchor_art, _, _ = _artifact(tok, arithmetic_records(12), rule="anchor")
    again = dllm.forced_masks(anchor_art, data, tok, tau=0.4)
    assert sum(int(m.sum()) for m in again.values()) == int((delta < -0.4).sum())
    # the random set of the same size: same count, response only, other tokens
    rand = dllm.random_forced_masks(masks, data, seed=1)
    assert sum(int(m.sum()) for m in rand.values()) == n_forced
    assert all(not bool(rand[int(ex["example_id"])][ex["labels"] == -100].any()) for ex in data)
    assert any(not torch.equal(rand[k], masks[k]) for k in masks)


def test_a_selector_with_another_tokenizer_is_refused():
    tok = diffusion_tokenizer()
    data, art, _, _ = _artifact(tok, arithmetic_records(6))
    other = make_tokenizer(special=SPECIAL + [MASK], chars=list("abcdefghijklmnopqrstuvwxyz0123456789+=;# \n:.{}\\!"))
    with pytest.raises(ValueError, match="do not share a tokenizer.*vocab differs"):
        dllm.forced_masks(art, data, other)
    with pytest.raises(ValueError, match="needs the diffusion model's tokenizer"):
        dllm.forced_masks(art, data, None)
    fewer = list(data)[:-1]
    with pytest.raises(ValueError, match="does not match this data"):
        dllm.forced_masks(art, fewer, tok)


# -- adapters ------------------------------------------------------------------------------

def test_adapter_refuses_causal_models_and_models_without_a_mask_token():
    tok = diffusion_tokenizer()
    with pytest.raises(ValueError, match="attends causally"):
        dllm.MaskedLMAdapter(tiny_llama(tok), tokenizer=tok)
    plain = make_tokenizer()
    with pytest.raises(ValueError, match="no mask token"):
        dllm.MaskedLMAdapter(tiny_bert(plain), tokenizer=plain)
    with pytest.raises(ValueError, match="outside the head"):
        dllm.MaskedLMAdapter(tiny_bert(plain), mask_token_id=len(plain) + 5)
    with pytest.raises(TypeError):
        dllm.MaskedLMAdapter("not a model")


def test_modernbert_adapter():
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    tok = diffusion_tokenizer()
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                           sep_token_id=2, mask_token_id=tok.mask_token_id)
    model = ModernBertForMaskedLM(cfg).eval()
    adapter = dllm.MaskedLMAdapter(model)
    ids, response = batch(B=2, L=9, V=len(tok) - 1)
    out = dllm.diffusion_sft_loss(adapter, ids, response, t=torch.tensor([0.5, 1.0]))
    logits = model(input_ids=out.corruption.noisy_ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(out.loss.double(), reference_loss(logits, ids, out.corruption),
                               rtol=1e-4, atol=1e-5)


def _save_model_dir(tmp_path, tok, auto_map=None):
    d = tmp_path / "dlm"
    tiny_bert(tok).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    if auto_map is not None:
        (d / "modeling_tiny_dlm.py").write_text(
            "from transformers import BertForMaskedLM\n\n"
            "class TinyDiffusionLM(BertForMaskedLM):\n    marker = 'remote code ran'\n")
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = auto_map
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_llada_style_loading_keeps_remote_code_off_unless_passed(tmp_path):
    tok = diffusion_tokenizer()
    d = _save_model_dir(tmp_path, tok)
    adapter, loaded_tok = dllm.load_llada(d, dtype=torch.float32)
    assert adapter.mask_token_id == tok.mask_token_id
    plain, _ = dllm.load_masked_lm(d)
    assert type(plain.model).__name__ == "BertForMaskedLM"
    d2 = _save_model_dir(tmp_path / "x", tok, auto_map={"AutoModel": "modeling_tiny_dlm.TinyDiffusionLM"})
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        dllm.load_llada(d2)
    adapter, _ = dllm.load_llada(d2, trust_remote_code=True, dtype=torch.float32)
    assert getattr(adapter.model, "marker", None) == "remote code ran"
    with pytest.raises(FileNotFoundError, match="local"):
        dllm.load_llada(tmp_path / "missing")


# -- generation and evaluation ----------------------------------------------------------------

class ScriptedAdapter:
    """Logits that favour token ``fill`` everywhere, ``eos`` at position ``eos_at`` of the answer."""

    def __init__(self, V=12, mask=11, fill=5, eos=2, eos_at=None, prompt_len=None):
        self.mask_token_id, self.V, self.fill, self.eos, self.eos_at = mask, V, fill, eos, eos_at
        self.model = torch.nn.Linear(1, 1)
        self.device = torch.device("cpu")
        self.calls = 0

    def logits(self, ids, attention):
        self.calls += 1
        B, L = ids.shape
        out = torch.randn(B, L, self.V) * 0.1
        out[..., self.fill] += 3.0
        out[..., self.mask_token_id] = -1e4
        if self.eos_at is not None:
            out[:, self.prompt_len + self.eos_at, self.eos] += 10.0
        return out


def test_generation_fills_every_block_and_stops_at_eos():
    a = ScriptedAdapter()
    a.prompt_len = 3
    gens, stats = dllm.diffusion_generate(a, [[1, 4, 4], [1, 6, 7]], gen_length=8, steps=4,
                                          block_length=4, eos_token_id=None, return_stats=True)
    assert [len(g) for g in gens] == [8, 8] and stats["forwards"] == 4
    assert all(a.mask_token_id not in g for g in gens)
    b = ScriptedAdapter(eos_at=0)
    b.prompt_len = 3
    gens, stats = dllm.diffusion_generate(b, [[1, 4, 4]], gen_length=16, steps=16, block_length=4,
                                          eos_token_id=2, return_stats=True)
    # the first step commits the most confident token, the EOS at position 0: done
    assert gens == [[]] and stats["forwards"] == 1 and stats["finished_early"] == 1


def test_generation_with_a_tiny_bert_and_mixed_prompt_lengths():
    tok = diffusion_tokenizer()
    adapter = dllm.MaskedLMAdapter(tiny_bert(tok), tokenizer=tok)
    prompts = [[1, 9, 10], [1, 9], [1, 11, 12]]
    for remasking in dllm.REMASKING:
        gens = dllm.diffusion_generate(adapter, prompts, gen_length=6, steps=6, block_length=3,
                                       eos_token_id=tok.eos_token_id, remasking=remasking)
        assert len(gens) == 3 and all(len(g) <= 6 for g in gens)
        assert all(adapter.mask_token_id not in g and tok.eos_token_id not in g for g in gens)


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, steps=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=8, steps=3, block_length=4), "multiple of the number of blocks"),
    (dict(gen_length=0, steps=2, block_length=4), "positive"),
    (dict(gen_length=8, steps=4, block_length=4, remasking="top"), "remasking"),
    (dict(gen_length=8, steps=4, block_length=4, temperature=-1.0), "temperature"),
])
def test_generation_refuses_bad_schedules(kw, match):
    a = ScriptedAdapter()
    with pytest.raises(ValueError, match=match):
        dllm.diffusion_generate(a, [[1, 2]], **kw)
    with pytest.raises(ValueError, match="mask token"):
        dllm.diffusion_generate(a, [[1, a.mask_token_id]], gen_length=4, steps=4, block_length=4)
    with pytest.raises(ValueError, match="empty"):
        dllm.diffusion_generate(a, [[]], gen_length=4, steps=4, block_length=4)


def test_diffusion_accuracy_uses_the_verifier():
    tok = diffusion_tokenizer()
    records = arithmetic_records(4)
    data = t3s.TraceDataset.from_records(t3s.read_traces(records), tok)

    class Answers(ScriptedAdapter):
        """Writes the gold answer's tokens for the first two prompts, junk for the others."""

        def logits(self, ids, attention):
            out = torch.full((ids.shape[0], ids.shape[1], len(tok)), -10.0)
            for b in range(ids.shape[0]):
                prompt = tok.decode(ids[b, :self.P].tolist(), skip_special_tokens=True)
                gold = [r for r in records if r["prompt"] == prompt][0]
                good = records.index(gold) < 2
                text = f"\\boxed{{{gold['answer'] if good else 'x'}}}"
                want = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for i, y in enumerate(want[: ids.shape[1] - self.P]):
                    out[b, self.P + i, y] = 10.0
            return out

    a = Answers(mask=tok.mask_token_id)
    a.P = len(dllm.prompt_tokens(data[0]))
    acc, details = dllm.diffusion_accuracy(a, tok, data, verifier="exact", gen_length=16, steps=16,
                                           block_length=8, return_details=True)
    assert acc == 0.5 and [d["correct"] for d in details].count(True) == 2


# -- the trainer ----------------------------------------------------------------------------

def test_trainer_trains_with_the_forced_set_and_logs_its_fraction(tmp_path):
    from transformers import TrainingArguments
    tok = diffusion_tokenizer()
    data, art, delta, keys = _artifact(tok, arithmetic_records(16))
    forced = dllm.forced_masks(art, data, tok)
    model = tiny_bert(tok).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=1)
    trainer = dllm.DiffusionTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok,
        data_collator=dllm.DiffusionCollator(tok.pad_token_id, forced_masks=forced))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    expected = int((delta < -0.2).sum()) / len(keys)   # batch = the whole data set
    for h in logs:
        assert h["t3s/forced_fraction"] == pytest.approx(expected)
        assert h["t3s/masked_fraction"] >= h["t3s/forced_fraction"]
        assert np.isfinite(h["loss"]) and h["loss"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    coll = dllm.DiffusionCollator(tok.pad_token_id, forced_masks={})
    with pytest.raises(ValueError, match="no forced mask"):
        coll([data[0]])
    with pytest.raises(ValueError, match="forced_weight"):
        dllm.DiffusionTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                              forced_weight="x")


def test_collator_eos_padding_is_response_and_forced_stays_on_real_tokens():
    tok = diffusion_tokenizer()
    data = t3s.TraceDataset.from_records(t3s.read_traces(arithmetic_records(3)), tok)
    exs = list(data)
    forced = {int(ex["example_id"]): (torch.as_tensor(ex["labels"]) != -100) for ex in exs}
    plain = dllm.DiffusionCollator(tok.pad_token_id, forced_masks=forced)([exs[0], exs[1]])
    assert bool((plain["forced"] == plain["response"]).all())
    assert not bool(plain["response"][plain["attention_mask"] == 0].any())
    out = dllm.DiffusionCollator(tok.pad_token_id, forced_masks=forced, eos_token_id=tok.eos_token_id,
                                 min_length=40)(exs)
    assert out["input_ids"].shape[1] == 40 and bool((out["attention_mask"] == 1).all())
    for i, ex in enumerate(exs):
        n = len(ex["input_ids"])
        assert bool((out["input_ids"][i, n:] == tok.eos_token_id).all())
        assert bool(out["response"][i, n:].all()) and not bool(out["forced"][i, n:].any())
        assert bool((out["labels"][i, n:] == tok.eos_token_id).all())
    with pytest.raises(ValueError, match="eos_token_id"):
        dllm.DiffusionCollator(0, min_length=10)
