"""t3s in a plain HF Trainer: TrajectoryCallback, the mask normaliser on every path, the
refusal of a mask headed for an unpatched model. Tiny Llamas on CPU.

Covered: recording with a plain ``transformers.Trainer`` (values equal a recomputation
at every step, keys are the kept tokens; TraceDataset and ``datasets.Dataset``);
a TrajectoryRecorder passed as a callback; TrajectoryCallback in T3STrainer; the
step-0 loss under gradient accumulation equal to the full-batch masked mean (plain
Trainer with the collators' default folding, plain Trainer + callback with weights,
T3STrainer with weights) and the one case that is refused; unpatched models.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import t3s  # noqa: E402
from t3s.trainer import LossMaskCallback, T3STrainer, TrajectoryCallback  # noqa: E402
from tiny import arithmetic_records, jsonl_lines, make_tokenizer, tiny_llama  # noqa: E402

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))


def make_ds(tok, n, rng):
    return t3s.TraceDataset.from_jsonl(
        jsonl_lines(arithmetic_records(n, seed=int(rng.integers(0, 1000)))), tok)


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=1,
                learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def random_masks(ds, rng, dtype):
    """example_id -> mask [L] on the response tokens; kept counts differ between examples."""
    out = {}
    for ex in ds:
        resp = (ex["labels"] != -100).numpy()
        keep = (rng.random(resp.size) < rng.uniform(0.3, 0.9)) & resp
        keep[np.flatnonzero(resp)[-1]] = True                # at least one kept token
        if dtype == torch.float32:
            out[int(ex["example_id"])] = torch.from_numpy(
                np.where(keep, rng.uniform(0.25, 2.0, resp.size), 0.0)).float()
        else:
            out[int(ex["example_id"])] = torch.from_numpy(keep)
    return out


def masked_mean(model, ds, masks):
    """Σ w·CE / Σ w over every labelled target of ``ds`` (an unpatched model, one pass)."""
    num = den = 0.0
    with torch.no_grad():
        for ex in ds:
            logits = model(input_ids=ex["input_ids"][None]).logits[0, :-1].float()
            y = ex["labels"][1:]
            w = masks[int(ex["example_id"])][1:].float() * (y != -100)
            num += float((w * F.cross_entropy(logits, y.clamp_min(0), reduction="none")).sum())
            den += float(w.sum())
    return num / den


class StepLoss(TrainerCallback):
    """The losses the model returned during the first optimizer step (a forward hook)."""

    def __init__(self, model):
        self.losses, self.step0 = [], True
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.step0 and module.training:
            self.losses.append(float(output["loss"].detach()))

    def on_step_end(self, args, state, control, **kw):
        self.step0 = False


class Snapshots(TrainerCallback):
    """A copy of the weights at the start of every optimizer step."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def read_steps(store, ds):
    table = t3s.TrajectoryReader(store, dataset_fingerprint=t3s.dataset_fingerprint(ds)).read()
    steps = np.asarray(table["step"])
    return {int(s): t3s.TokenTable(np.asarray(table["example_id"])[steps == s],
                                   np.asarray(table["position"])[steps == s],
                                   logprob=np.asarray(table["logprob"])[steps == s])
            for s in np.unique(steps)}


# -------------------------------------------------------------------------------------
# recording in a plain Trainer
# -------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", ["trace", "hf"])
def test_plain_trainer_records_what_a_recomputation_gives(tmp_path, tok, rng, data):
    ds = make_ds(tok, 6, rng)
    masks = random_masks(ds, rng, torch.bool)
    train = ds
    if data == "hf":
        datasets = pytest.importorskip("datasets")
        train = datasets.Dataset.from_list(
            [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in ex.items()} for ex in ds])
    base = tiny_llama(tok, seed=int(rng.integers(0, 100)))
    model = t3s.patch(copy.deepcopy(base))
    snaps = Snapshots()
    cb = TrajectoryCallback(tmp_path / "traj")
    trainer = Trainer(model=model, args=targs(tmp_path, per_device_train_batch_size=3,
                                              gradient_accumulation_steps=2, max_steps=3),
                      train_dataset=train, processing_class=tok, callbacks=[snaps, cb],
                      data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
    trainer.train()
    assert cb.recorder.closed
    got = read_steps(tmp_path / "traj", ds)
    assert sorted(got) == [0, 1, 2] and len(snaps.states) == 3
    kept = t3s.TokenTable(*map(np.asarray, zip(*[(e, p) for e, m in masks.items()
                                                for p in np.flatnonzero(m.numpy()) if p > 0])))
    for step, table in got.items():
        assert table.same_keys(kept), step                 # every kept token, nothing else
        fresh = copy.deepcopy(base)
        fresh.load_state_dict(snaps.states[step])
        exact = t3s.profile(fresh, ds, progress=False)
        ref = dict(zip(zip(exact["example_id"].to_pylist(), exact["position"].to_pylist()),
                       exact["logprob"].to_numpy()))
        want = [ref[(int(e), int(p))] for e, p in zip(table.example_id, table.position)]
        np.testing.assert_allclose(table["logprob"], want, rtol=0, atol=2e-4)
    assert not np.allclose(got[0].align(got[2])["logprob"], got[0]["logprob"])
    # evaluation after training: example_id is kept out of the model, nothing is recorded
    assert np.isfinite(trainer.evaluate(train)["eval_loss"])
    assert sorted(read_steps(tmp_path / "traj", ds)) == [0, 1, 2]


def test_trajectory_callback_in_t3s_trainer(tmp_path, tok, rng):
    ds = make_ds(tok, 4, rng)
    model = tiny_llama(tok)                                  # T3STrainer patches it
    theta0 = copy.deepcopy(model)
    cb = TrajectoryCallback(tmp_path / "traj")
    trainer = T3STrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=ds,
                         processing_class=tok, callbacks=[cb])
    assert cb.counts_kept_items
    trainer.train()
    step0 = read_steps(tmp_path / "traj", ds)[0]
    exact = t3s.profile(theta0, ds, progress=False)
    ref = t3s.TokenTable(exact["example_id"].to_numpy(), exact["position"].to_numpy(),
                         logprob=exact["logprob"].to_numpy())
    assert step0.same_keys(ref)
    np.testing.assert_allclose(step0.align(ref)["logprob"], step0["logprob"], atol=2e-4)
    with pytest.raises(ValueError, match="not both"):
        T3STrainer(model=tiny_llama(tok), args=targs(tmp_path), train_dataset=ds,
                   processing_class=tok, trajectory_dir=tmp_path / "t2",
                   callbacks=[TrajectoryCallback(tmp_path / "t3")])


def test_recorder_is_not_a_callback(tmp_path, tok, rng):
    ds = make_ds(tok, 4, rng)
    rec = t3s.TrajectoryRecorder(tmp_path / "t", dataset_fingerprint=t3s.dataset_fingerprint(ds))
    with pytest.raises(TypeError, match=r"TrajectoryCallback\(store_dir\)"):
        Trainer(model=t3s.patch(tiny_llama(tok)), args=targs(tmp_path), train_dataset=ds,
                data_collator=t3s.PaddedCollator(tok.pad_token_id), callbacks=[rec])
    # the documented way: the same recorder, through the callback
    cb = TrajectoryCallback(recorder=rec)
    Trainer(model=t3s.patch(tiny_llama(tok)), args=targs(tmp_path), train_dataset=ds,
            data_collator=t3s.PaddedCollator(tok.pad_token_id), callbacks=[cb]).train()
    assert rec.closed and rec.steps_recorded == 1
    with pytest.raises(ValueError, match="exactly one"):
        TrajectoryCallback()
    with pytest.raises(TypeError, match="unknown recorder option"):
        TrajectoryCallback(tmp_path / "x", fsynk=True)


# -------------------------------------------------------------------------------------
# the loss normaliser: step-0 loss under accumulation == full-batch masked mean
# -------------------------------------------------------------------------------------

PATHS = [
    # (trainer, collator, mask dtype, callback)
    ("plain", "padded", torch.bool, None),
    ("plain", "packed", torch.bool, None),
    ("plain", "padded", torch.float32, "mask"),          # one micro-batch per step
    ("plain", "padded", torch.float32, "trajectory"),
    ("t3s", "padded", torch.float32, None),
    ("t3s", "packed", torch.float32, "trajectory"),
]


@pytest.mark.parametrize("trainer_kind,collator,dtype,callback", PATHS)
def test_step_loss_is_the_full_batch_masked_mean(tmp_path, tok, rng, trainer_kind, collator,
                                                 dtype, callback):
    ds = make_ds(tok, 4, rng)
    masks = random_masks(ds, rng, dtype)
    base = tiny_llama(tok, seed=int(rng.integers(0, 100)))
    want = masked_mean(base, ds, masks)
    model = t3s.patch(copy.deepcopy(base))
    probe = StepLoss(model)
    bs, ga = (4, 1) if (trainer_kind == "plain" and dtype == torch.float32) else (1, 4)
    cbs = [probe]
    if callback == "mask":
        cbs.append(LossMaskCallback())
    elif callback == "trajectory":
        cbs.append(TrajectoryCallback(tmp_path / "traj"))
    make = (t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks) if collator == "padded"
            else t3s.PackedCollator(loss_masks=masks))
    cls = Trainer if trainer_kind == "plain" else T3STrainer
    # Without a t3s callback the plain Trainer's column filter would drop example_id, which
    # the collators need to look the masks up.
    keep = {"remove_unused_columns": False} if callback is None and cls is Trainer else {}
    cls(model=model, args=targs(tmp_path, per_device_train_batch_size=bs,
                                gradient_accumulation_steps=ga, **keep),
        train_dataset=ds, processing_class=tok, callbacks=cbs, data_collator=make).train()
    assert len(probe.losses) == ga
    assert sum(probe.losses) == pytest.approx(want, rel=1e-5)


def test_plain_trainer_weights_need_the_callback(tmp_path, tok, rng):
    """Without the callback a plain Trainer divides weighted losses by the labelled count
    (the case that cannot be automatic); with accumulation the callback refuses it."""
    ds = make_ds(tok, 4, rng)
    masks = random_masks(ds, rng, torch.float32)
    base = tiny_llama(tok)
    model = t3s.patch(copy.deepcopy(base))
    probe = StepLoss(model)
    Trainer(model=model, args=targs(tmp_path, remove_unused_columns=False), train_dataset=ds,
            callbacks=[probe],
            data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks)).train()
    assert probe.losses[0] != pytest.approx(masked_mean(base, ds, masks), rel=1e-3)
    trainer = Trainer(model=t3s.patch(copy.deepcopy(base)),
                      args=targs(tmp_path, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2),
                      train_dataset=ds, callbacks=[LossMaskCallback()],
                      data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
    with pytest.raises(ValueError, match="T3STrainer"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), base.parameters()))


# -------------------------------------------------------------------------------------
# a mask headed for an unpatched model
# -------------------------------------------------------------------------------------

def test_mask_for_an_unpatched_model_is_refused(tmp_path, tok, rng):
    ds = make_ds(tok, 4, rng)
    masks = random_masks(ds, rng, torch.bool)
    model = tiny_llama(tok)
    for make in (lambda: t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks, model=model),
                 lambda: t3s.PackedCollator(loss_masks=masks, model=model)):
        with pytest.raises(ValueError, match="not patched by t3s"):
            make()(list(ds))
        t3s.patch(model)
        assert "loss_mask" in make()(list(ds))
        t3s.unpatch(model)
    for cb in (LossMaskCallback(), TrajectoryCallback(tmp_path / "t")):
        with pytest.raises(ValueError, match=r"t3s\.patch\(model\)"):
            Trainer(model=tiny_llama(tok), args=targs(tmp_path), train_dataset=ds,
                    data_collator=t3s.PaddedCollator(tok.pad_token_id), callbacks=[cb])
    # patched when the Trainer was built, unpatched before training: the first forward says so
    model = t3s.patch(tiny_llama(tok))
    trainer = Trainer(model=model, args=targs(tmp_path, remove_unused_columns=False),
                      train_dataset=ds, callbacks=[LossMaskCallback()],
                      data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks))
    t3s.unpatch(model)
    with pytest.raises(ValueError, match="not patched by t3s"):
        trainer.train()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_trajectory_callback_in_t3s_sft_trainer(tmp_path, tok, rng):
    trl = pytest.importorskip("trl")
    from t3s.trainer import T3SSFTTrainer

    ds = make_ds(tok, 4, rng)
    masks = random_masks(ds, rng, torch.bool)
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                           gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                           save_strategy="no", use_cpu=True, bf16=False,
                           gradient_checkpointing=False, disable_tqdm=True, seed=0)
    cb = TrajectoryCallback(tmp_path / "traj")
    T3SSFTTrainer(model=tiny_llama(tok), args=config, train_dataset=ds, processing_class=tok,
                  callbacks=[cb],
                  data_collator=t3s.PaddedCollator(tok.pad_token_id, loss_masks=masks)).train()
    kept = t3s.TokenTable(*map(np.asarray, zip(*[(e, p) for e, m in masks.items()
                                                for p in np.flatnonzero(m.numpy()) if p > 0])))
    assert read_steps(tmp_path / "traj", ds)[0].same_keys(kept)


def test_a_step_without_a_seen_forward_is_an_error(tmp_path, tok, rng):
    class Direct(Trainer):
        """Calls model.forward itself: module hooks do not run."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "example_id"}
            return model.forward(**inputs).loss

    ds = make_ds(tok, 4, rng)
    cb = TrajectoryCallback(tmp_path / "traj")
    trainer = Direct(model=t3s.patch(tiny_llama(tok)), args=targs(tmp_path), train_dataset=ds,
                     data_collator=t3s.PaddedCollator(tok.pad_token_id), callbacks=[cb])
    with pytest.raises(RuntimeError, match="saw no training forward"):
        trainer.train()
    assert cb.recorder.closed


def test_collators_fold_01_masks_by_default(tok, rng):
    ds = list(make_ds(tok, 3, rng))
    bool_masks = random_masks(ds, rng, torch.bool)
    weights = random_masks(ds, rng, torch.float32)
    for make in (lambda **kw: t3s.PaddedCollator(tok.pad_token_id, **kw),
                 lambda **kw: t3s.PackedCollator(**kw)):
        plain = make()(ds)["labels"]
        for masks in (bool_masks, {k: v.float() for k, v in bool_masks.items()}):
            batch = make(loss_masks=masks)(ds)
            # the Trainer's label count is now the kept count
            assert t3s.count_loss_items(batch["labels"]) == t3s.count_loss_items(
                plain, batch["loss_mask"])
            assert torch.equal(make(loss_masks=masks, fold_mask_into_labels=False)(ds)["labels"],
                               plain)
        assert torch.equal(make(loss_masks=weights)(ds)["labels"], plain)   # weights: no fold
        folded = make(loss_masks=weights, fold_mask_into_labels=True)(ds)
        assert torch.equal(folded["labels"] != -100, (plain != -100) & (folded["loss_mask"] != 0))


def test_example_id_is_named_while_attached(tok):
    import inspect

    model = t3s.patch(tiny_llama(tok))
    cb = LossMaskCallback()
    cb.attach(model)
    assert "example_id" in inspect.signature(model.forward).parameters
    from t3s.hf.trl_head import TRLHeadHook

    def callback_pre_hooks():  # t3s.patch's own pre-hook (TRL's fused head) stays
        return [h for h in model._forward_pre_hooks.values() if not isinstance(h, TRLHeadHook)]

    assert len(callback_pre_hooks()) == 1 and len(model._forward_hooks) == 1
    cb.detach()
    # t3s.patch names example_id itself (the Trainer keeps the column); detach removes
    # only what attach added: its hooks
    assert "example_id" in inspect.signature(model.forward).parameters
    assert not callback_pre_hooks() and not model._forward_hooks
    assert len(model._forward_pre_hooks) == 1
