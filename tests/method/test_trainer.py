"""t3s.trainer: the HF Trainer / TRL SFTTrainer integration, on tiny Llamas on CPU.

Covered: 3 steps with trajectory recording and accuracy evaluation (store keys per
step, step-0 values against an exact pass, history JSON, bottleneck, checkpoint
pruning, logged metrics); padding-free (packed) batches; online bottleneck detection
stopping the run; resuming with the history read back; gradient accumulation with
masks equal to one full batch; masked tokens giving zero gradient through the
Trainer path; a TRL SFTTrainer smoke run and the error without TRL; bad input.
"""

import copy
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import t3s  # noqa: E402
from t3s.trainer import (  # noqa: E402
    ACCURACY_FILE, METRICS, AccuracyCallback, T3STrainer, read_accuracy_history)
from tiny import (  # noqa: E402
    ScriptedVerifier, arithmetic_records, jsonl_lines, make_tokenizer, tiny_llama)

from transformers import TrainerCallback, TrainingArguments  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tok):
    return t3s.TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(8, seed=1)), tok)


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=3,
                learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class GradCapture(TrainerCallback):
    """Copies of the accumulated gradients just before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def random_masks(ds, rng, dtype):
    """example_id -> mask [L] aligned with labels; kept counts differ between examples."""
    out = {}
    for ex in ds:
        resp = (ex["labels"] != -100).numpy()
        keep = rng.random(resp.size) < rng.uniform(0.2, 0.9)
        if dtype == torch.float32:
            m = torch.from_numpy(np.where(keep, rng.uniform(0.25, 2.0, resp.size), 0.0) * resp)
        else:
            m = torch.from_numpy(keep & resp)
        out[int(ex["example_id"])] = m.to(dtype)
    return out


# -------------------------------------------------------------------------------------
# recording, evaluation, pruning, metrics
# -------------------------------------------------------------------------------------

def test_trainer_records_and_evaluates(tmp_path, tok, dataset):
    model = tiny_llama(tok)
    theta0 = copy.deepcopy(model)
    traj = tmp_path / "traj"
    accs = [0.5, 0.25, 0.75, 1.0]                  # steps 0..3: the bottleneck is step 1
    cb = AccuracyCallback(tok, dataset, heldout=dataset, eval_steps=1,
                          # evaluations alternate train / heldout, 4 answers each
                          verifier=ScriptedVerifier([a for a in accs for _ in (0, 1)], 4),
                          subset_size=4, heldout_subset_size=4, max_new_tokens=4, batch_size=4,
                          prune_checkpoints=True)
    trainer = T3STrainer(model=model, args=targs(tmp_path, save_strategy="steps", save_steps=1),
                         train_dataset=dataset, processing_class=tok, trajectory_dir=traj,
                         callbacks=[cb])
    assert cb.trainer is trainer
    trainer.train()
    assert trainer.recorder._closed

    # the store: one row per response token per step, keyed like the dataset
    reader = t3s.TrajectoryReader(traj, dataset_fingerprint=t3s.dataset_fingerprint(dataset),
                                  tokenizer_fingerprint=t3s.tokenizer_fingerprint(tok))
    table = reader.read()
    assert sorted(reader.steps().tolist()) == [0, 1, 2]
    keys = dataset.keys()
    for step in (0, 1, 2):
        rows = table.filter(np.asarray(table["step"]) == step)
        got = t3s.TokenTable(rows["example_id"].to_numpy(), rows["position"].to_numpy())
        assert got.same_keys(keys), step
    # step 0 is θ0: the recorded log-probs equal an exact forward-only pass
    exact = t3s.profile(theta0, dataset, progress=False)
    step0 = table.filter(np.asarray(table["step"]) == 0)
    a = t3s.TokenTable(step0["example_id"].to_numpy(), step0["position"].to_numpy(),
                       logprob=step0["logprob"].to_numpy())
    b = t3s.TokenTable(exact["example_id"].to_numpy(), exact["position"].to_numpy(),
                       logprob=exact["logprob"].to_numpy())
    np.testing.assert_allclose(a.align(b)["logprob"], a["logprob"], rtol=0, atol=2e-4)
    # later steps moved
    step2 = table.filter(np.asarray(table["step"]) == 2)
    assert not np.allclose(np.sort(step2["logprob"].to_numpy()), np.sort(a["logprob"]))

    # the accuracy history, the bottleneck and the pruned checkpoints
    hist = read_accuracy_history(tmp_path)
    assert hist["train_acc"] == {0: 0.5, 1: 0.25, 2: 0.75, 3: 1.0}
    assert hist["heldout_acc"] == {0: 0.5, 1: 0.25, 2: 0.75, 3: 1.0}
    assert hist["bottleneck_step"] == t3s.find_bottleneck(hist["train_acc"]) == cb.bottleneck == 1
    # the final answers on the same 4 training prompts at every evaluation, for the
    # verifier-free bottleneck
    assert sorted(hist["train_answers"]) == [0, 1, 2, 3]
    assert all(len(a) == 4 and all(isinstance(x, str) for x in a)
               for a in hist["train_answers"].values())
    assert 0.0 <= min(t3s.answer_agreement(hist["train_answers"]).values()) <= 1.0
    ckpts = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path)
                   if d.startswith("checkpoint-"))
    assert ckpts == [1, 3]                          # θ_b and the latest (for resuming)
    assert hist["kept_checkpoints"] == [1, 3] and hist["deleted_checkpoints"] == [2]
    assert (tmp_path / ACCURACY_FILE).exists()

    # logged: accuracies, and the token metrics with every training loss
    logs = trainer.state.log_history
    acc_logs = [r for r in logs if "t3s/train_acc" in r]
    assert [r["step"] for r in acc_logs] == [0, 1, 2, 3]
    # θ0 (step 0) is no bottleneck candidate (find_bottleneck's rule): none logged at step 0
    assert [r.get("t3s/bottleneck_step") for r in acc_logs] == [None, 1, 1, 1]
    loss_logs = [r for r in logs if "loss" in r]
    assert len(loss_logs) == 3
    for r in loss_logs:
        assert set(METRICS) <= set(r)
        assert r["t3s/kept_fraction"] == 1.0
        # no mask: the loss is the mean of -log p over the kept tokens
        assert r["t3s/target_logprob"] == pytest.approx(-r["loss"], rel=1e-4)


def test_packed_batches_record_exact_values(tmp_path, tok, dataset):
    """Padding-free batches (t3s.PackedCollator): keys map back through position_ids."""
    model = tiny_llama(tok)
    exact = t3s.profile(copy.deepcopy(model), dataset, progress=False)
    trainer = T3STrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=dataset,
                         processing_class=tok, trajectory_dir=tmp_path / "traj",
                         data_collator=t3s.PackedCollator())
    trainer.train()
    table = t3s.TrajectoryReader(tmp_path / "traj", dataset_fingerprint=None).read()
    got = t3s.TokenTable(table["example_id"].to_numpy(), table["position"].to_numpy(),
                         logprob=table["logprob"].to_numpy())
    ref = t3s.TokenTable(exact["example_id"].to_numpy(), exact["position"].to_numpy(),
                         logprob=exact["logprob"].to_numpy())
    np.testing.assert_allclose(got.align(ref)["logprob"], got["logprob"], rtol=0, atol=2e-4)


def test_online_detection_stops_training(tmp_path, tok, dataset):
    accs = [0.5, 0.25, 0.5, 0.5, 0.5, 0.5]          # recovered at steps 2 and 3 → stop at 3
    cb = AccuracyCallback(tok, dataset, eval_steps=1, verifier=ScriptedVerifier(accs, 4),
                          subset_size=4, max_new_tokens=2, recover_margin=0.1, patience=2,
                          stop_on_recovery=True)
    trainer = T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, max_steps=10),
                         train_dataset=dataset, processing_class=tok, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 3
    assert cb.tracker.done and cb.tracker.declared_at == 3 and cb.bottleneck == 1
    assert read_accuracy_history(tmp_path / ACCURACY_FILE)["declared_at"] == 3


def test_resume_reads_history_back(tmp_path, tok, dataset):
    def run(accs, max_steps, **train_kw):
        cb = AccuracyCallback(tok, dataset, eval_steps=1, verifier=ScriptedVerifier(accs, 4),
                              subset_size=4, max_new_tokens=2, prune_checkpoints=True)
        trainer = T3STrainer(model=tiny_llama(tok),
                             args=targs(tmp_path, max_steps=max_steps, save_steps=2,
                                        per_device_train_batch_size=4, save_strategy="steps"),
                             train_dataset=dataset, processing_class=tok, callbacks=[cb],
                             trajectory_dir=tmp_path / "traj")
        trainer.train(**train_kw)
        return cb

    run([0.5, 0.25, 0.5, 0.75, 1.0], 4)
    assert read_accuracy_history(tmp_path)["train_acc"] == {0: .5, 1: .25, 2: .5, 3: .75, 4: 1.0}
    # step 2's checkpoint was deleted (above the minimum), step 4's is the latest
    assert set(os.listdir(tmp_path)) == {ACCURACY_FILE, "checkpoint-4", "traj"}
    # resume from the last checkpoint with 2 more steps: steps <= 4 come from the file
    cb = run([0.25, 0.0], 6, resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert cb.history == {0: .5, 1: .25, 2: .5, 3: .75, 4: 1.0, 5: .25, 6: 0.0}
    assert cb.bottleneck == 6 and read_accuracy_history(tmp_path)["bottleneck_step"] == 6
    assert set(os.listdir(tmp_path)) == {ACCURACY_FILE, "checkpoint-6", "traj"}
    steps = t3s.TrajectoryReader(tmp_path / "traj", dataset_fingerprint=None).steps()
    assert steps.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("exclude_initial", [False, True])
def test_pruning_follows_the_tracker_rule(tmp_path, tok, dataset, exclude_initial):
    """AccuracyCallback deletes exactly what its BottleneckTracker's retention rule says
    (one rule, in the tracker): also for a tracker whose rule differs from the default."""
    from types import SimpleNamespace

    class KeepsEverythingEvaluated(t3s.BottleneckTracker):
        def should_keep_checkpoint(self, step, acc=None):
            return True

    rng = np.random.default_rng(0)
    for tracker in (t3s.BottleneckTracker(margin=0.1, exclude_initial=exclude_initial),
                    KeepsEverythingEvaluated(exclude_initial=exclude_initial)):
        out = tmp_path / type(tracker).__name__
        cb = AccuracyCallback(tok, dataset, tracker=tracker, prune_checkpoints=True)
        for step in range(0, 40, 2):                # odd steps are saved but never evaluated
            tracker.update(step, float(rng.integers(0, 11) / 10))
        saved = list(range(0, 40))
        for step in saved:
            (out / f"checkpoint-{step}").mkdir(parents=True)
        expected = set(saved) - set(tracker.checkpoints_to_delete(saved))
        args = SimpleNamespace(output_dir=str(out))
        state = SimpleNamespace(is_world_process_zero=True, global_step=39)
        cb.on_save(args, state, SimpleNamespace())
        left = {int(d.name.split("-")[1]) for d in out.iterdir() if d.name.startswith("checkpoint-")}
        assert left == expected
        assert left == {39} | {s for s in tracker.history if tracker.should_keep_checkpoint(s)}
        assert sorted(cb.deleted_checkpoints) == sorted(set(saved) - left)
        assert read_accuracy_history(out)["kept_checkpoints"] == sorted(left)


# -------------------------------------------------------------------------------------
# gradient accumulation and masks
# -------------------------------------------------------------------------------------

def reference_grads(model, ds, masks):
    """Gradient of Σ w·ce / Σ w over all examples' kept targets (HF shift), from logits."""
    model = copy.deepcopy(model)
    model.zero_grad()
    num, den = 0.0, 0.0
    for ex in ds:
        ids = ex["input_ids"][None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        y = ex["labels"][1:]
        w = masks[int(ex["example_id"])][1:].float() * (y != -100)
        ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
        num = num + (w * ce).sum()
        den = den + w.sum()
    (num / den).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_accumulated_masked_microbatches_equal_full_batch(tmp_path, tok, mask_dtype):
    ds = t3s.TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(4, seed=2)), tok)
    masks = random_masks(ds, np.random.default_rng(int(torch.randint(0, 2**31, ()))), mask_dtype)
    model = tiny_llama(tok)
    grads = {}
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        cap = GradCapture()
        trainer = T3STrainer(model=copy.deepcopy(model),
                             args=targs(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs,
                                        gradient_accumulation_steps=ga, max_steps=1,
                                        max_grad_norm=0.0, logging_steps=1),
                             train_dataset=ds, processing_class=tok, callbacks=[cap],
                             data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
        trainer.train()
        grads[(bs, ga)] = cap.grads[0]
        kept = sum(float(m[1:].float().sum()) for m in masks.values())
        assert trainer.state.log_history[0]["t3s/kept_tokens"] == pytest.approx(kept, rel=1e-6)
    ref = reference_grads(model, ds, masks)
    for key, g in grads.items():
        assert g.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{key} {name}: {m}")


def test_masked_tokens_get_zero_gradient(tmp_path, tok):
    ds = t3s.TraceDataset.from_jsonl(jsonl_lines(arithmetic_records(4, seed=3)), tok)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    masks = random_masks(ds, rng, torch.bool)
    for ex in ds:  # each example drops at least one trained token (a draw may keep all)
        keep, trained = masks[int(ex["example_id"])], ex["labels"] != -100
        if not (trained & ~keep).any():
            keep[int(trained.nonzero()[0])] = False
    perturbed = []
    for ex in ds:
        ex = dict(ex)
        labels = ex["labels"].clone()
        drop = (labels != -100) & ~masks[int(ex["example_id"])]
        assert drop.any()
        labels[drop] = torch.from_numpy(rng.integers(0, len(tok), int(drop.sum())))
        ex["labels"] = labels
        perturbed.append(ex)
    model = tiny_llama(tok)
    finals = []
    for data in (list(ds), perturbed):
        trainer = T3STrainer(model=copy.deepcopy(model),
                             args=targs(tmp_path, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=2, max_steps=1, optim="sgd",
                                        learning_rate=1.0, max_grad_norm=0.0),
                             train_dataset=data, processing_class=tok,
                             data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    moved = any(not torch.equal(finals[0][n], p) for n, p in model.named_parameters())
    assert moved
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=0, atol=1e-7)


# -------------------------------------------------------------------------------------
# TRL
# -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_trainer_smoke(tmp_path, tok, dataset):
    trl = pytest.importorskip("trl")
    from t3s.trainer import T3SSFTTrainer

    assert issubclass(T3SSFTTrainer, trl.SFTTrainer)
    masks = random_masks(dataset, np.random.default_rng(0), torch.bool)
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                           learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                           use_cpu=True, bf16=False, gradient_checkpointing=False,
                           disable_tqdm=True, seed=0)
    trainer = T3SSFTTrainer(model=tiny_llama(tok), args=config, train_dataset=dataset,
                            processing_class=tok, trajectory_dir=tmp_path / "traj",
                            data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
    trainer.train()
    assert trainer.state.global_step == 2
    reader = t3s.TrajectoryReader(tmp_path / "traj",
                                  dataset_fingerprint=t3s.dataset_fingerprint(dataset))
    table = reader.read()
    assert sorted(reader.steps().tolist()) == [0, 1]
    # only kept tokens are trained, so only they are recorded
    kept = {(e, int(p)) for e, m in masks.items() for p in np.flatnonzero(m.numpy()) if p > 0}
    got = set(zip(table["example_id"].to_pylist(), table["position"].to_pylist()))
    assert got and got <= kept
    loss_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(loss_logs) == 2 and all(0 < r["t3s/kept_fraction"] < 1 for r in loss_logs)


def test_sft_trainer_without_trl_says_how_to_install(monkeypatch):
    import t3s.trainer as tt
    import t3s.trainer.sft as sft

    monkeypatch.setattr(sft, "_SFT_CLASS", None)  # the cached class: build it again
    monkeypatch.setitem(sys.modules, "trl", None)   # `import trl` raises ImportError
    with pytest.raises(ImportError, match="pip install trl"):
        tt.T3SSFTTrainer


# -------------------------------------------------------------------------------------
# bad input
# -------------------------------------------------------------------------------------

def test_mask_length_differs_from_labels(tmp_path, tok, dataset):
    # through the t3s collator
    short = {int(ex["example_id"]): torch.ones(ex["labels"].numel() - 1, dtype=torch.bool)
             for ex in dataset}
    trainer = T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, max_steps=1),
                         train_dataset=dataset, processing_class=tok,
                         data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=short))
    with pytest.raises(ValueError, match="aligned with labels"):
        trainer.train()

    # a batch whose loss_mask is one column short of labels (any collator)
    def bad_collator(features):
        batch = t3s.PaddedCollator(tok.pad_token_id)(features)
        batch["loss_mask"] = torch.ones_like(batch["labels"][:, 1:], dtype=torch.bool)
        return batch

    trainer = T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, max_steps=1),
                         train_dataset=dataset, processing_class=tok, data_collator=bad_collator)
    with pytest.raises(ValueError, match=r"loss_mask has shape .* aligned with labels"):
        trainer.train()


def test_recording_needs_example_ids(tmp_path, tok, dataset):
    no_ids = [{k: v for k, v in ex.items() if k != "example_id"} for ex in dataset]
    with pytest.raises(ValueError, match="example_id"):
        T3STrainer(model=tiny_llama(tok), args=targs(tmp_path), train_dataset=no_ids,
                   processing_class=tok, trajectory_dir=tmp_path / "traj")

    # the data has ids, but the batches lose them (a collator that drops the column)
    def dropping(features):
        batch = t3s.PaddedCollator(tok.pad_token_id)(features)
        batch.pop("example_id")
        return batch

    recorder = t3s.TrajectoryRecorder(tmp_path / "traj2",
                                      dataset_fingerprint=t3s.dataset_fingerprint(dataset))
    trainer = T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, max_steps=1),
                         train_dataset=dataset, processing_class=tok, recorder=recorder,
                         data_collator=dropping)
    with pytest.raises(ValueError, match="needs the batch's 'example_id'"):
        trainer.train()
    assert recorder._closed                          # closed even though training failed


def test_unsupported_combinations(tmp_path, tok, dataset):
    with pytest.raises(ValueError, match="label_smoothing"):
        T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, label_smoothing_factor=0.1),
                   train_dataset=dataset, processing_class=tok)
    rec = t3s.TrajectoryRecorder(tmp_path / "t", dataset_fingerprint="x")
    with pytest.raises(ValueError, match="not both"):
        T3STrainer(model=tiny_llama(tok), args=targs(tmp_path), train_dataset=dataset,
                   processing_class=tok, trajectory_dir=tmp_path / "t2", recorder=rec)
    rec.close()
    cb = AccuracyCallback(tok, dataset, prune_checkpoints=True)
    with pytest.raises(ValueError, match="save_total_limit"):
        T3STrainer(model=tiny_llama(tok), args=targs(tmp_path, save_total_limit=2),
                   train_dataset=dataset, processing_class=tok, callbacks=[cb])
    with pytest.raises(ValueError, match="eval_steps"):
        AccuracyCallback(tok, dataset, eval_steps=0)
