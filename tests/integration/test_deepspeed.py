"""DeepSpeed ZeRO-3 on CPU: the patched fused loss on 2 gloo ranks equals one process.

ZeRO-3 partitions every parameter and gathers a module's parameters in its own
forward / backward hooks, so the head's weight is whole only during the head's
call: `t3s.hf.patch` computes the loss there. Each check runs an unpatched model
too (HF's own loss through DeepSpeed), so that a DeepSpeed-on-CPU problem is
told apart from a t3s one.

Needs ``pip install -e '.[deepspeed]'`` (DeepSpeed's CPU accelerator,
``DS_ACCELERATOR=cpu``, gloo); skipped without it.
"""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from t3s.hf import patch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GatherOnAccess(dict):
    """A module's ``_parameters`` that logs every read, as ZeRO-3's ``ZeROOrderedDict``
    all-gathers a partitioned parameter read inside the engine's forward."""

    def __init__(self, items, log):
        super().__init__(items)
        self.log = log

    def __getitem__(self, key):
        self.log.append(f"read {key}")
        return super().__getitem__(key)


def test_zero3_head_is_read_only_inside_its_call():
    """A head weight tagged as a ZeRO-3 parameter (``ds_id``) is read only during the
    head's own call, where the engine's hooks have gathered it: the loss is computed there,
    and the loss and every gradient still equal HF's own loss (one process, no DeepSpeed)."""
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM(config).float().train()
    model = transformers.LlamaForCausalLM(config).float().train()
    model.load_state_dict(ref.state_dict())
    patch(model, backend="torch")
    ids = torch.randint(0, 101, (3, 9))
    head = model.lm_head
    log = []
    head.weight.ds_id = 0  # what DeepSpeed tags its partitioned parameters with
    head._parameters = GatherOnAccess(head._parameters, log)
    head.register_forward_pre_hook(lambda module, args: log.append("call"))
    head.register_forward_hook(lambda module, args, output: log.append("return"))
    out = model(input_ids=ids, labels=ids)
    events, log[:] = list(log), []
    assert out.logits is None
    assert events[0] == "call" and events[-1] == "return" and "read weight" in events, events
    out.loss.backward()
    assert log == [], log  # backward uses what the call saved
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


ZERO3_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, transformers
import deepspeed
from deepspeed.utils import safe_get_full_grad
from t3s.hf import patch

# The CPU accelerator JIT-compiles a shared-memory all-reduce when its comm backend starts
# (tens of seconds on a fresh machine); only inference_all_reduce uses it, ZeRO does not.
# (`deepspeed.comm.torch` the attribute is torch itself, hence sys.modules.)
ds_comm_torch = sys.modules["deepspeed.comm.torch"]
if hasattr(ds_comm_torch, "build_shm_op"):
    ds_comm_torch.build_shm_op = lambda: None
dist.init_process_group("gloo")
rank = dist.get_rank()
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             # persistence 0: DeepSpeed would otherwise keep this tiny model's parameters
             # whole after the first step (each is under its default 100k elements)
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             # a plain torch optimizer: DeepSpeed's CPU Adam would be JIT-compiled
             "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
             "steps_per_print": 10 ** 9}
COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
llama = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))  # noqa: E731
tied = lambda: transformers.Qwen2ForCausalLM(  # noqa: E731
    transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))


def check(make, patched, init, name):
    # one process on 4 sequences vs 2 ranks on 2 each: the same loss and every gradient
    torch.manual_seed(0)
    ref = make().float().train()
    ids = torch.randint(0, 101, (4, 8))
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    local = ids[2 * rank: 2 * rank + 2]
    if init == "zero.Init":  # built partitioned, as HF's from_pretrained does under ZeRO-3
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            model = make().float().train()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(ref.state_dict())
    else:
        model = make().float().train()
        model.load_state_dict(ref.state_dict())
    if patched:
        patch(model, backend="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG,
                                      dist_init_required=False)
    head = model.get_output_embeddings().weight
    ref_grads = dict(ref.named_parameters())
    # step 1 records DeepSpeed's module trace, step 2 prefetches along it (lr 0: same weights)
    for step in (1, 2):
        assert head.numel() == 0, (name, step, tuple(head.shape))  # partitioned outside calls
        out = engine(input_ids=local, labels=local)
        assert (out.logits is None) == patched, name
        # gathered by the head's own hooks, not registered as an external parameter of the
        # model (whole through its entire forward and backward)
        external = [m for m in model.modules() if id(head) in getattr(m, "_external_params", {})]
        assert not external, (name, [type(m).__name__ for m in external])
        total = out.loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / 2, ref_loss.detach(), rtol=1e-5, atol=1e-6,
                                   msg=f"{name}, step {step}")
        engine.backward(out.loss)
        for pname, p in model.named_parameters():
            grad = safe_get_full_grad(p)  # all-gathers the partitioned, rank-averaged gradient
            assert grad is not None, f"{name}: {pname} has no gradient"
            torch.testing.assert_close(grad, ref_grads[pname].grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}, step {step}: {pname}")
        engine.step()
    engine.destroy()


for make, model_name in ((llama, "llama"), (tied, "tied qwen2")):
    for patched in (False, True):
        check(make, patched, "after", f"{model_name}, patched={patched}")
check(llama, True, "zero.Init", "llama built under zero.Init, patched")
with open(os.path.join(sys.argv[1], f"ok.{rank}"), "w") as f:  # every check passed
    f.write("ok")
dist.barrier()
# gloo's worker threads can abort a normal interpreter exit ("terminate called without an
# active exception"); the checks are done, so leave at once
os._exit(0)
"""


def _ds_env() -> dict:
    """The environment that runs a script on DeepSpeed's CPU accelerator with this checkout
    importable."""
    return dict(os.environ, DS_ACCELERATOR="cpu",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _script(path, text: str):
    """(path, env): ``text`` written to ``path``, and `_ds_env`."""
    path.write_text(text)
    return path, _ds_env()


def test_zero3_fused_loss_matches_one_process(tmp_path):
    """ZeRO-3 on 2 gloo ranks (DeepSpeed's CPU accelerator): a Llama and a tied-embedding
    Qwen2, patched and not, partitioned by deepspeed.initialize or built under zero.Init:
    the all-reduced loss / 2 and every parameter's full gradient equal one process."""
    pytest.importorskip(
        "deepspeed",
        reason="deepspeed is not installed (pip install -e '.[deepspeed]'); this check runs "
               "ZeRO-3 on its CPU accelerator with gloo")
    script, env = _script(tmp_path / "zero3.py", ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("ok.*")) == ["ok.0", "ok.1"], proc.stdout[-2000:]


TRAINER_SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
import transformers
from transformers import TrainingArguments
import t3s
from t3s.demo import BASE_DIR
from t3s.trainer import T3STrainer

out, config, use_cpu, batch = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1", int(sys.argv[4])
if config:  # as in ZERO3_SCRIPT: skip the CPU accelerator's JIT-compiled shm all-reduce
    import deepspeed.comm.torch  # noqa: F401
    ds_comm_torch = sys.modules["deepspeed.comm.torch"]
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None
tok = transformers.AutoTokenizer.from_pretrained(str(BASE_DIR))
rows = [{"prompt": f"{a}+{b}=", "response": f"{a}+{b}={a + b};\\\\boxed{{{a + b}}}",
         "answer": str(a + b)} for a in range(10, 22) for b in range(30, 32)]  # 24: 3 batches of 8
args = TrainingArguments(output_dir=out, max_steps=3, report_to=[], deepspeed=config,
                         use_cpu=use_cpu, per_device_train_batch_size=batch, save_strategy="no",
                         disable_tqdm=True, learning_rate=1e-3, logging_steps=1, seed=0)
rank = int(os.environ.get("RANK", "0"))
path = os.path.join(out, f"traces.{rank}.jsonl")
with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\\n" for r in rows)
data = t3s.TraceDataset.from_jsonl(path, tok)
model = transformers.AutoModelForCausalLM.from_pretrained(str(BASE_DIR))
trainer = T3STrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                     trajectory_dir=os.path.join(out, "traj"))
trainer.train()
result = {"engine": str(trainer.accelerator.distributed_type), "world_size": args.world_size,
          "partitioned": all(hasattr(p, "ds_id") for p in model.parameters()),
          "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
with open(os.path.join(out, f"result.{rank}.json"), "w") as f:
    json.dump(result, f)
sys.stdout.flush()
os._exit(0)  # gloo's threads can abort a normal interpreter exit
"""


@pytest.mark.parametrize("use_cpu", [True, False])
def test_t3s_trainer_with_the_shipped_zero3_config(tmp_path, use_cpu):
    """The README's recipe: `T3STrainer` with `TrainingArguments(deepspeed=
    "examples/deepspeed_zero3.json", use_cpu=True)` under `torchrun --nproc_per_node 2` on
    CPU trains with every parameter partitioned and the data split (per-device batch 4);
    its losses and trajectory (a shard per rank) equal one process with batch 8. Without
    ``use_cpu`` accelerate's DeepSpeed state on CPU reports one process, and the Trainer
    gives every rank the same batches: t3s says so, and rank 0's shard alone holds the
    trajectory, equal to one process with batch 4."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e "
                        "'.[deepspeed]')")
    import json
    from t3s.trajectory import TrajectoryReader
    script, env = _script(tmp_path / "train.py", TRAINER_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    flag = "1" if use_cpu else "0"
    for cmd in ([sys.executable, str(script), str(one), "", "1", "8" if use_cpu else "4"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 str(script), str(two), os.path.join(ROOT, "examples", "deepspeed_zero3.json"),
                 flag, "4"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    replicated = "every rank trains on the same batches; rank 0 records" in proc.stderr
    assert replicated == (not use_cpu), proc.stderr[-3000:]
    ref = json.loads((one / "result.0.json").read_text())
    for rank in (0, 1):
        got = json.loads((two / f"result.{rank}.json").read_text())
        assert got["engine"] == "DistributedType.DEEPSPEED" and got["partitioned"], got
        assert got["world_size"] == (2 if use_cpu else 1)
        assert len(got["losses"]) == 3
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                                   rtol=1e-5, atol=1e-5)
    shards = sorted(p.name for p in (two / "traj").glob("traj-rank*.arrow"))
    assert shards == (["traj-rank00000.arrow", "traj-rank00001.arrow"] if use_cpu
                      else ["traj-rank00000.arrow"])
    t1, t2 = (TrajectoryReader(d / "traj", dataset_fingerprint=None).read().to_pandas()
              for d in (one, two))
    assert sorted(set(t2["step"])) == [0, 1, 2] and len(t2) == len(t1) > 0
    keys = ["step", "example_id", "position"]
    t1, t2 = (t.sort_values(keys).reset_index(drop=True) for t in (t1, t2))
    assert (t1[keys].values == t2[keys].values).all()
    torch.testing.assert_close(torch.tensor(t2["logprob"].values),
                               torch.tensor(t1["logprob"].values), rtol=1e-4, atol=1e-4)


def test_plain_trl_sft_trainer_under_zero3_runs_on_t3s(tmp_path):
    """A plain trl.SFTTrainer under the shipped ZeRO-3 config on 2 CPU ranks: on a patched
    model TRL's fused head runs on t3s's kernels (inside the head's call, where ZeRO-3 has
    gathered the weight), and the losses and TRL's metrics equal the unpatched run's."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e "
                        "'.[deepspeed]')")
    pytest.importorskip("trl")
    import json
    script = os.path.join(ROOT, "tests", "plain_trl_sft.py")
    results = {}
    for flag in ("1", "0"):
        out = tmp_path / f"patched{flag}"
        out.mkdir()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                               "2", script, str(out), flag, "deepspeed",
                               os.path.join(ROOT, "examples", "deepspeed_zero3.json")],
                              capture_output=True, text=True, env=_ds_env(), timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[flag] = [json.loads((out / f"result.{r}.json").read_text()) for r in (0, 1)]
    for ours, ref in zip(results["1"], results["0"]):
        assert ours["engine"] == "DistributedType.DEEPSPEED" and ours["sharded"], ours
        assert ours["world_size"] == 2 and len(ours["logs"]) == 3
        assert ours["t3s_calls"] >= 3 and ref["t3s_calls"] == 0
        for a, b in zip(ours["logs"], ref["logs"]):
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
